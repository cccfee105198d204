"""Cross-validation: folds are stratified, disjoint and covering; a held-out group never trains; any
backend reads any set of sample ids; the summary's numbers are the mean/sd of the per-fold numbers;
a killed `cornpipe cv` skips its finished folds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import needs_library

from cornpipe.cli import cli
from cornpipe.errors import ConfigError
from cornpipe.loaders import make_loader
from cornpipe.loaders.base import IMAGENET
from cornpipe.runs.config import TrainConfig
from cornpipe.runs.cv import summarize_runs
from cornpipe.runs.folds import fold_ids, stratified_folds
from cornpipe.shards.shard_set import ShardSet


def samples(shards: Path) -> list[dict]:
    return ShardSet(shards).manifest["samples"]


def test_stratified_folds_are_disjoint_covering_and_balanced_per_cell(tiny_shards: Path) -> None:
    rows = samples(tiny_shards)
    all_ids = sorted(s["id"] for s in rows)
    k = 3
    vals = []
    for fold in range(k):
        cfg = TrainConfig(shards=str(tiny_shards), out="x", folds=k, fold=fold)
        train, val, _name = fold_ids(rows, cfg)
        assert not set(train) & set(val) and sorted(train + val) == all_ids
        vals.append(set(val))
    assert set().union(*vals) == set(all_ids) and sum(len(v) for v in vals) == len(all_ids)
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    cell = {s["id"]: (s["position"], s["grade"]) for s in rows}
    for c in set(cell.values()):  # every position x grade cell is spread evenly over the folds
        per_fold = [sum(cell[i] == c for i in v) for v in vals]
        assert max(per_fold) - min(per_fold) <= 1, (c, per_fold)
    # the assignment is a function of the seed
    cells = [cell[i] for i in all_ids]
    assert (stratified_folds(cells, k, 1) == stratified_folds(cells, k, 1)).all()
    assert not (stratified_folds(cells, k, 1) == stratified_folds(cells, k, 2)).all()


@pytest.mark.parametrize("group", ["stage", "source"])
def test_a_held_out_group_is_never_trained_on(group: str, tiny_shards: Path) -> None:
    rows = samples(tiny_shards)
    of = {s["id"]: s[group] for s in rows}
    names = sorted(set(of.values()))
    seen = []
    for fold in range(len(names)):
        train, val, name = fold_ids(rows, TrainConfig(shards=str(tiny_shards), out="x", fold_group=group, fold=fold))
        assert {of[i] for i in val} == {names[fold]} and name == f"{group} {names[fold]}"
        assert names[fold] not in {of[i] for i in train}
        seen.append(names[fold])
    assert seen == names
    with pytest.raises(ConfigError, match="fold 99 does not exist"):
        fold_ids(rows, TrainConfig(shards=str(tiny_shards), out="x", fold_group=group, fold=99))


@pytest.mark.parametrize("backend", ["torch", "resident", "ffcv", "dali"])
def test_any_backend_reads_a_subset_of_sample_ids_from_both_splits(backend: str, tiny_shards: Path) -> None:
    needs_library(backend)
    rows = samples(tiny_shards)
    pick = [s for s in rows if s["split"] == "val"][:3] + [s for s in rows if s["split"] == "train"][:4]
    ids = [s["id"] for s in pick]
    kwargs = dict(backend=backend, batch_size=4, image_size=32, device="cpu", workers=0, dtype=torch.float32,
                  oversample="none", shuffle=False, sample_ids=ids, normalization=IMAGENET)
    with make_loader(tiny_shards, "val", **kwargs) as loader:
        batches = list(loader)
    got = torch.cat([b.sample_id for b in batches]).tolist()
    assert got == ids
    with make_loader(tiny_shards, "val", **{**kwargs, "backend": "torch"}) as reference:  # the same pictures
        expected = torch.cat([b.images for b in reference])
    assert (torch.cat([b.images for b in batches]) - expected).abs().mean() < 0.05  # 0.003 measured; a wrong image ~0.5
    labels = {s["id"]: (s["position"], float(s["grade"])) for s in pick}
    for b in batches:
        assert b.images.shape[1:] == (3, 32, 32)
        for i, p, g in zip(b.sample_id.tolist(), b.position.tolist(), b.grade.tolist(), strict=True):
            assert labels[i] == (p, g)


def test_summary_is_the_mean_and_sd_of_the_per_fold_numbers() -> None:
    rng = np.random.default_rng(0)
    rows, per_fold = [], []
    for fold in range(4):
        accs = rng.uniform(0.3, 0.9, size=2)  # two seeds per fold
        per_fold.append(accs.mean())
        for seed, acc in enumerate(accs):
            rows.append({"fold": fold, "seed": seed, "val": {
                "position_accuracy": float(acc), "position_recall": {"a": float(acc), "b": None},
                "confusion": [[fold, 1], [0, seed]]}})
    summary = summarize_runs(rows, ["a", "b"])
    m = summary["metrics"]["position_accuracy"]
    assert m["per_fold"] == pytest.approx(per_fold)
    assert m["mean"] == pytest.approx(np.mean(per_fold)) and m["sd"] == pytest.approx(np.std(per_fold, ddof=1))
    half = 3.182446305284263 * np.std(per_fold, ddof=1) / 2  # t(0.975, 3) * sd / sqrt(4)
    assert m["ci95"] == pytest.approx([np.mean(per_fold) - half, np.mean(per_fold) + half])
    assert summary["position_recall"]["a"]["mean"] == pytest.approx(np.mean(per_fold))
    assert summary["position_recall"]["b"]["n"] == 0
    # each seed's folds add up to its out-of-fold matrix; the seeds are averaged, not added
    assert summary["confusion_per_seed"] == {"0": [[6, 4], [0, 0]], "1": [[6, 4], [0, 4]]}
    assert summary["pooled_confusion"] == [[6, 4], [0, 2]]


POSITIONS, SCALE = ["l", "m", "t"], [0.0, 3.0, 5.0, 7.0, 9.0]


def fake_cv_dir(out: Path, n: int, folds: int, seeds: list[int]) -> None:
    """What `cornpipe cv` leaves behind, without training: per fold x seed a run folder with config.json,
    cv_result.json and a best.pt holding random best-epoch predictions (val_predictions.csv from it)."""
    from cornpipe.models.metrics import compute_metrics
    from cornpipe.runs.checkpoint import CHECKPOINT_FORMAT
    from cornpipe.runs.cv import RESULT_FILE, run_name
    from cornpipe.runs.evaluation import write_predictions

    rng = np.random.default_rng(1)
    samples = [{"id": i, "path": f"s{i}.jpg", "source": "9l", "stage": 9, "split": "train"} for i in range(n)]
    fold_of = np.arange(n) % folds
    truth = rng.integers(0, 3, n), rng.choice(SCALE, n)
    for fold in range(folds):
        ids = np.flatnonzero(fold_of == fold)
        for seed in seeds:
            run = out / run_name(fold, seed)
            run.mkdir(parents=True)
            prob = rng.dirichlet([1, 1, 1], len(ids)).astype(np.float32)
            grade = rng.uniform(0, 9, len(ids)).astype(np.float32)
            data = {"positions": POSITIONS, "grade_scale": SCALE, "counts": {"train": n - len(ids), "val": len(ids)},
                    "fold": {"name": f"fold {fold + 1}/{folds}"}}
            predictions = {"sample_id": torch.tensor(ids), "position_true": torch.tensor(truth[0][ids]),
                           "position_prob": torch.from_numpy(prob),
                           "grade_true": torch.tensor(truth[1][ids], dtype=torch.float32),
                           "grade_pred": torch.from_numpy(grade)}
            torch.save({"format": CHECKPOINT_FORMAT, "data": data, "val_predictions": predictions}, run / "best.pt")
            write_predictions(run, samples)
            val = compute_metrics(truth[0][ids], prob, truth[1][ids], grade, grade_scale=SCALE, positions=POSITIONS)
            (run / "config.json").write_text(json.dumps({"tolerance": 2.0, "data": data}))
            (run / RESULT_FILE).write_text(json.dumps({"fold": fold, "seed": seed, "best_epoch": 1,
                                                       "val": {**val, "loss": 1.0}}))


def test_out_of_fold_predictions_count_every_sample_once_per_seed(tmp_path: Path) -> None:
    from sklearn.metrics import confusion_matrix, f1_score

    from cornpipe.runs.cv import write_summary

    n, folds, seeds = 14, 3, [0, 5]
    fake_cv_dir(tmp_path, n, folds, seeds)
    summary = write_summary(tmp_path, [(f, s) for f in range(folds) for s in seeds])
    with (tmp_path / "oof_predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n * len(seeds)
    recomputed = []
    for seed in seeds:
        mine = [r for r in rows if int(r["seed"]) == seed]
        assert sorted(int(r["sample_id"]) for r in mine) == list(range(n))  # exactly once per seed
        assert {r["run"] for r in mine} == {f"fold{f}-seed{seed}" for f in range(folds)}
        true = np.array([POSITIONS.index(r["position_true"]) for r in mine])
        prob = np.array([[float(r[f"prob_{p}"]) for p in POSITIONS] for r in mine])
        pred = prob.argmax(axis=1)
        assert [POSITIONS[i] for i in pred] == [r["position_pred"] for r in mine]
        err = np.abs(np.array([float(r["grade_pred"]) - float(r["grade_true"]) for r in mine]))
        got = next(s for s in summary["oof"]["per_seed"] if s["seed"] == seed)
        assert got["n_samples"] == n
        assert got["position_accuracy"] == pytest.approx((pred == true).mean())
        assert got["position_macro_f1"] == pytest.approx(f1_score(true, pred, average="macro", labels=[0, 1, 2]))
        assert got["grade_mae"] == pytest.approx(err.mean())
        assert got["grade_within_tol"] == pytest.approx((err <= 2.0).mean())
        recomputed.append(confusion_matrix(true, pred, labels=[0, 1, 2]))
    # the pooled matrix counts every sample once (not once per seed) and is the seeds' OOF matrices averaged
    assert np.sum(summary["pooled_confusion"]) == pytest.approx(n)
    assert np.array(summary["pooled_confusion"]) == pytest.approx(np.mean(recomputed, axis=0))
    accs = [s["position_accuracy"] for s in summary["oof"]["per_seed"]]
    assert summary["oof"]["metrics"]["position_accuracy"]["mean"] == pytest.approx(np.mean(accs))
    md = (tmp_path / "cv.md").read_text()
    assert "## Pooled out-of-fold predictions" in md and "averaged" in md
    # two runs of one seed holding out the same sample: not out-of-fold, refused
    other = tmp_path / "fold1-seed0" / "val_predictions.csv"
    lines = other.read_text().splitlines()
    first = (tmp_path / "fold0-seed0" / "val_predictions.csv").read_text().splitlines()[1]
    other.write_text("\n".join([lines[0], first, *lines[2:]]) + "\n")
    with pytest.raises(ConfigError, match=r"seed 0: sample\(s\) \[0\] were held out by two runs"):
        write_summary(tmp_path, [(f, s) for f in range(folds) for s in seeds])


@pytest.mark.slow
def test_cv_command_summarises_and_a_killed_cv_skips_finished_folds(tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    args = ["cv", str(tiny_shards), "--out", str(out), "--folds", "2", "--model", "resnet_plus_tiny",
            "--image-size", "32", "--batch-size", "16", "--max-batches", "2", "--workers", "0", "--epochs", "2",
            "--device", "cpu", "--bootstrap", "0"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    summary = json.loads((out / "cv.json").read_text())
    assert [r["run"] for r in summary["rows"]] == ["fold0-seed0", "fold1-seed0"]
    accs = [r["position_accuracy"] for r in summary["rows"]]
    acc = summary["metrics"]["position_accuracy"]
    assert acc["mean"] == pytest.approx(np.mean(accs)) and acc["sd"] == pytest.approx(np.std(accs, ddof=1))
    # every sample validated once: the pooled out-of-fold confusion counts the whole set
    assert np.array(summary["pooled_confusion"]).sum() == sum(r["n_val"] for r in summary["rows"]) == 54
    assert (out / "cv.md").read_text().startswith("# Cross-validation: 2 folds")
    assert (out / "cv_confusion.png").stat().st_size > 0
    # each run's val_predictions.csv is its best epoch's: the logged best-epoch metrics, recomputed
    for row in summary["rows"]:
        with (out / row["run"] / "val_predictions.csv").open(newline="") as f:
            preds = list(csv.DictReader(f))
        best = torch.load(out / row["run"] / "best.pt", weights_only=True)["val"]
        assert len(preds) == row["n_val"] == best["n_samples"]
        hits = [p["position_true"] == p["position_pred"] for p in preds]
        assert np.mean(hits) == pytest.approx(best["position_accuracy"], abs=1e-12)
        err = [abs(float(p["grade_pred"]) - float(p["grade_true"])) for p in preds]
        assert np.mean(err) == pytest.approx(best["grade_mae"], rel=1e-5)
    with (out / "oof_predictions.csv").open(newline="") as f:
        assert sorted(int(r["sample_id"]) for r in csv.DictReader(f)) == sorted(s["id"] for s in samples(tiny_shards))
    # "kill" the second fold after its first epoch: keep epoch 1 only, as a killed run leaves it
    run = out / "fold1-seed0"
    (run / "cv_result.json").unlink()
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n")
    torch.save({**state, "epoch": 1}, run / "last.pt")  # pretend: last.pt of epoch 1
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert "fold0-seed0: finished earlier, skipped" in again.output
    assert "fold1-seed0: resuming" in again.output
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_cv_refuses_options_it_sets_itself(tiny_shards: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["cv", str(tiny_shards), "--out", str(tmp_path / "cv"), "--fold", "1"])
    assert result.exit_code == 1 and "Error: cornpipe cv sets --fold itself" in result.output
    result = CliRunner().invoke(cli, ["train", str(tiny_shards), "--out", str(tmp_path / "r"), "--seeds", "0,x"])
    assert result.exit_code == 1 and "Error: --seeds must be distinct" in result.output


def test_cv_nproc_gives_each_torchrun_run_the_config_a_single_process_run_gets(
        tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cv --nproc N` (and `train --seeds --nproc N`) hands each run to torchrun as `cornpipe train` options:
    they must rebuild exactly the config the in-process run trains with (--config file included), fresh
    and resumed."""
    from cornpipe.cli.runs import train_command
    from cornpipe.runs.checkpoint import CHECKPOINT_FORMAT

    class Trained(Exception):
        pass

    seen: list[tuple[TrainConfig, bool]] = []

    def fake_train(cfg: TrainConfig, *, resume: bool = False, **_: object) -> None:
        seen.append((cfg, resume))
        raise Trained

    monkeypatch.setattr("cornpipe.train.train", fake_train)
    # torchrun's ranks run `python -m cornpipe train ARGS`: here, the same command in this process
    monkeypatch.setattr("cornpipe.runs.distributed.launch",
                        lambda nproc, args: train_command.main(args, standalone_mode=False))
    toml = tmp_path / "run.toml"
    toml.write_text('plateau_factor = 0.3\nmomentum = 0.8\nepochs = 9\n')  # fields without a flag, and one with
    args = ["cv", str(tiny_shards), "--out", str(tmp_path / "cv"), "--folds", "3", "--seeds", "4",
            "--fold-seed", "2", "--config", str(toml), "--loss-weights", "0.6,0.4", "--lr", "3e-4", "--ema",
            "--no-verify", "--monitor", "grade_mae", "--drop-path", "0.05", "--device", "cpu"]
    for resume in (False, True):
        for nproc in ([], ["--nproc", "2"]):
            assert isinstance(CliRunner().invoke(cli, args + nproc).exception, Trained)
        (single, single_resume), (ranks, ranks_resume) = seen[-2:]
        assert ranks == single and ranks_resume == single_resume == resume
        assert (single.out, single.seed, single.folds, single.fold, single.fold_seed) == (
            str(tmp_path / "cv" / "fold0-seed4"), 4, 3, 0, 2)
        assert (single.plateau_factor, single.momentum, single.epochs, single.loss_weights) == (
            0.3, 0.8, 9, (0.6, 0.4))
        run = Path(single.out)  # a killed run: its last.pt holds the config it started with
        run.mkdir(parents=True, exist_ok=True)
        torch.save({"format": CHECKPOINT_FORMAT, "config": single.to_dict()}, run / "last.pt")
    # `train --seeds --nproc` goes the same way
    seeds = ["train", str(tiny_shards), "--out", str(tmp_path / "seeds"), "--seeds", "3,1", "--no-ema", "--epochs", "2"]
    for nproc in ([], ["--nproc", "2"]):
        assert isinstance(CliRunner().invoke(cli, seeds + nproc).exception, Trained)
    (single, _), (ranks, _) = seen[-2:]
    assert ranks == single and (single.out, single.seed, single.folds) == (str(tmp_path / "seeds" / "seed3"), 3, 0)
