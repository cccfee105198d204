"""`cornpipe sweep`: trials over cv folds write sweep.md and a best.toml that train takes; a rerun
continues the study (nothing redone, a killed trial retried); a bad space is one Error line before any
trial; a failing trial is a row; median pruning stops a trial below earlier ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_run, error_line, installed

needs_optuna = pytest.mark.skipif(not installed("optuna"), reason="the sweep extra (optuna) is not installed")

QUICK = ("--model", "resnet_plus_tiny", "--image-size", "32", "--batch-size", "16", "--max-batches", "2",
         "--workers", "0", "--epochs", "1", "--device", "cpu", "--bootstrap", "0", "--folds", "2")


def sweep(shards: Path, out: Path, space: Path, trials: int):
    return cli_run("sweep", shards, "--out", out, "--trials", trials, "--space", space, *QUICK)


def rows(out: Path) -> list[list[str]]:
    lines = (out / "sweep.md").read_text().splitlines()
    body = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| trial")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in body]


@needs_optuna
@pytest.mark.slow  # five 2-fold cv trainings: 37 s alone, 2 min on a busy 2-core CPU
def test_sweep_writes_a_best_config_train_takes_and_a_rerun_continues(tiny_shards: Path, tmp_path: Path) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from cornpipe.runs.config import config_from_sources, load_toml

    space = tmp_path / "space.toml"
    space.write_text('lr = {low = 1e-4, high = 1e-2, log = true}\nschedule = ["plateau", "cosine"]\n')
    out = tmp_path / "sweep"
    first = sweep(tiny_shards, out, space, 2)
    assert first.exit_code == 0, first.output
    table = rows(out)
    assert [r[1] for r in table] == ["complete", "complete"] and {r[0] for r in table} == {"0", "1"}
    means = [float(r[2].split(" ± ")[0]) for r in table]
    assert means == sorted(means, reverse=True)  # best first
    assert all(r[4] == "2" and r[3].startswith("[") for r in table)  # 2 folds, an interval
    # every trial is a cv folder with its two folds
    assert all(json.loads((out / f"trial-00{n}" / "cv.json").read_text())["folds"] == 2 for n in (0, 1))
    # best.toml: TrainConfig keys only, the best trial's values, the whole split; train --config takes it
    best = load_toml(out / "best.toml")
    assert "out" not in best and best["folds"] == 0 and best["model"] == "resnet_plus_tiny"
    assert best["monitor"] == "position_macro_f1"  # the best epochs were chosen by the objective
    cfg = config_from_sources({"out": str(tmp_path / "run")}, config_file=out / "best.toml")
    trial_cfg = json.loads((out / f"trial-00{table[0][0]}" / "fold0-seed0" / "config.json").read_text())
    assert cfg.lr == pytest.approx(trial_cfg["lr"]) and cfg.schedule == trial_cfg["schedule"]
    printed = cli_run("train", "--config", out / "best.toml", "--out", tmp_path / "run", "--print-config")
    assert printed.exit_code == 0 and 'model = "resnet_plus_tiny"' in printed.output

    # a rerun with the same --trials redoes nothing
    stamp = (out / "trial-000" / "fold0-seed0" / "best.pt").stat().st_mtime_ns
    again = sweep(tiny_shards, out, space, 2)
    assert again.exit_code == 0, again.output
    assert "2 of 2 trials finished earlier" in again.output and "training" not in again.output
    assert len(rows(out)) == 2 and (out / "trial-000" / "fold0-seed0" / "best.pt").stat().st_mtime_ns == stamp

    # a sweep killed mid-trial: the study holds a running trial; the rerun marks it failed and retries it
    study = optuna.load_study(study_name="cornpipe-sweep",
                              storage=JournalStorage(JournalFileBackend(str(out / "sweep.journal"))))
    killed = study.ask()
    killed.suggest_float("lr", 1e-4, 1e-2, log=True)
    killed.suggest_categorical("schedule", ["plateau", "cosine"])
    killed.set_user_attr("folder", "trial-002")
    more = sweep(tiny_shards, out, space, 3)  # --trials 3: one more finished trial
    assert more.exit_code == 0, more.output
    assert "trial 2 was killed mid-run" in more.output
    states = {r[0]: (r[1], r[6], r[7]) for r in rows(out)}
    assert states["2"][0] == "failed" and "killed mid-run" in states["2"][2]
    assert states["3"][:2] == ("complete", "trial-002")  # the retry, in the killed trial's folder
    assert sorted(states) == ["0", "1", "2", "3"]
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-000", "trial-001", "trial-002"]


@needs_optuna
@pytest.mark.parametrize(("text", "message"), [
    ("learning_rate = [1e-3]\n", "unknown key 'learning_rate'"),
    ("lr = {low = 1e-2, high = 1e-3}\n", "low must be below high"),
    ("lr = {low = 0.0, high = 1e-3, log = true}\n", "a log range needs low > 0"),
    ("label_smoothing = {low = 0.0, high = 1.5}\n", "label_smoothing = 1.5"),
    ('schedule = ["plateau", "step"]\n', "schedule = 'step'"),
    ("seed = [0, 1]\n", "the sweep sets it itself"),
])
def test_a_bad_space_is_one_error_line_before_any_trial(tiny_shards: Path, tmp_path: Path, text: str,
                                                        message: str) -> None:
    space = tmp_path / "space.toml"
    space.write_text(text)
    result = cli_run("sweep", tiny_shards, "--out", tmp_path / "sweep", "--trials", 2, "--space", space)
    assert result.exit_code == 1 and message in error_line(result)
    assert not (tmp_path / "sweep").exists()


@needs_optuna
def test_a_failing_trial_is_a_row_with_its_reason(tiny_shards: Path, tmp_path: Path) -> None:
    space = tmp_path / "space.toml"
    space.write_text('model = ["no_such_model"]\n')  # TrainConfig takes any name; building the model fails
    out = tmp_path / "sweep"
    result = sweep(tiny_shards, out, space, 1)
    assert result.exit_code == 0, result.output
    [row] = rows(out)
    assert row[1] == "failed" and "unknown model 'no_such_model'" in row[7]
    assert not (out / "best.toml").exists()


@needs_optuna
def test_a_rerun_with_other_fixed_settings_is_refused(tiny_shards: Path, tmp_path: Path) -> None:
    space = tmp_path / "space.toml"
    space.write_text('model = ["no_such_model"]\n')
    out = tmp_path / "sweep"
    assert sweep(tiny_shards, out, space, 1).exit_code == 0
    result = cli_run("sweep", tiny_shards, "--out", out, "--trials", 1, "--space", space, *QUICK[:-2], "--folds", 3)
    assert result.exit_code == 1 and "holds a sweep started with other settings (folds 2 -> 3)" in error_line(result)


@needs_optuna
def test_median_pruning_stops_a_trial_below_earlier_ones_after_its_first_fold(
        tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from cornpipe.runs import cv, sweep
    from cornpipe.runs.config import TrainConfig
    from cornpipe.runs.sweep_space import Param
    from cornpipe.shards.shard_set import ShardSet

    trained: list[tuple[str, int]] = []  # (trial folder, fold)
    value = {"trial-003": 0.1}  # every other trial scores 0.9 on every fold

    def fake_folds(cfg, out, samples, seeds, train_fn, log):  # run_folds without training
        for fold in range(cfg.folds):
            train_fn(dataclasses.replace(cfg, fold=fold, out=str(out / f"fold{fold}-seed0")), resume=False, force=False)
        scores = [value.get(out.name, 0.9)] * cfg.folds
        return {"metrics": {"position_macro_f1": {**cv.interval(scores), "per_fold": scores}}}

    monkeypatch.setattr(cv, "run_folds", fake_folds)
    monkeypatch.setattr(sweep, "_run_value", lambda run, metric: value.get(run.parent.name, 0.9))
    base = TrainConfig(shards=str(tiny_shards), out=str(tmp_path / "sweep"), folds=3)
    study = sweep.run_sweep(base, tmp_path / "sweep", ShardSet(tiny_shards).manifest["samples"], [0], 4,
                            [Param("ema", choices=(False, True))],
                            lambda cfg, **kw: trained.append((Path(cfg.out).parent.name, cfg.fold)), lambda line: None)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 + ["PRUNED"]
    assert [f for t, f in trained if t == "trial-003"] == [0]  # its folds 1 and 2 never trained
    assert [r[1] for r in rows(tmp_path / "sweep")] == ["complete"] * 3 + ["pruned"]


def test_without_optuna_the_sweep_is_one_error_line_naming_the_extra(tiny_shards: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    result = cli_run("sweep", tiny_shards, "--out", tmp_path / "sweep", "--trials", 1)
    assert result.exit_code == 1 and "pip install 'cornpipe[sweep]'" in error_line(result)
    assert not (tmp_path / "sweep").exists()
