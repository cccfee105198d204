"""Issue 26 for `cornpipe cv`: a rerun continues only the config it started with (another config is one
`Error:` line, or a new cv with --force), one cv per folder at a time, intervals inside the metric's
range, and a warning when folds are too small to mean anything."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_run, error_line

from cornpipe.runs.config import TrainConfig
from cornpipe.runs.cv import interval, run_folds, summarize_runs
from cornpipe.runs.lock import FolderLock

TINY = ["--model", "resnet_plus_tiny", "--image-size", "32", "--batch-size", "16", "--max-batches", "1",
        "--workers", "0", "--epochs", "1", "--device", "cpu", "--bootstrap", "0", "--no-verify"]


@pytest.fixture(scope="module")
def finished_cv(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cvsafety") / "cv"
    result = cli_run("cv", tiny_shards, "--out", out, "--folds", "2", *TINY)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def a_cv(finished_cv: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "cv"
    shutil.copytree(finished_cv, copy)
    return copy


def test_cv_rerun_with_another_config_is_refused_and_nothing_changes(a_cv: Path, tiny_shards: Path) -> None:
    before = (a_cv / "cv.json").read_text()
    (a_cv / "fold1-seed0" / "cv_result.json").unlink()  # killed in fold 1
    result = cli_run("cv", tiny_shards, "--out", a_cv, "--folds", "2", *TINY, "--lr", "0.01")
    assert result.exit_code == 1
    assert error_line(result) == (f"Error: {a_cv} holds a cv started with another config (lr 0.002 -> 0.01); "
                                  "rerun it with the options it started with to continue it, or add --force "
                                  "to start a new cv there")
    assert (a_cv / "cv.json").read_text() == before


def test_cv_rerun_with_another_model_is_one_line_not_a_state_dict_traceback(a_cv: Path, tiny_shards: Path) -> None:
    (a_cv / "fold1-seed0" / "cv_result.json").unlink()
    args = [a if a != "resnet_plus_tiny" else "resnet_plus18" for a in TINY]
    result = cli_run("cv", tiny_shards, "--out", a_cv, "--folds", "2", *args)
    assert result.exit_code == 1
    assert "another config (model 'resnet_plus_tiny' -> 'resnet_plus18')" in error_line(result)


def test_cv_force_starts_a_new_cv_and_keeps_the_users_files(a_cv: Path, tiny_shards: Path) -> None:
    (a_cv / "notes.txt").write_text("mine")
    result = cli_run("cv", tiny_shards, "--out", a_cv, "--folds", "2", *TINY, "--lr", "0.01", "--force")
    assert result.exit_code == 0, result.output
    assert "its runs and summary are removed" in " ".join(result.output.split())
    assert "fold0-seed0: training" in result.output  # not "finished earlier"
    config = json.loads((a_cv / "fold0-seed0" / "config.json").read_text())
    assert config["lr"] == 0.01
    assert (a_cv / "notes.txt").read_text() == "mine"


def test_cv_rerun_under_the_same_config_continues(a_cv: Path, tiny_shards: Path) -> None:
    (a_cv / "fold1-seed0" / "cv_result.json").unlink()
    result = cli_run("cv", tiny_shards, "--out", a_cv, "--folds", "2", *TINY, "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "fold0-seed0: finished earlier, skipped" in result.output


def test_a_cv_started_by_an_older_cornpipe_continues_under_a_newer_one(a_cv: Path, tiny_shards: Path) -> None:
    # a setting added since the cv started is missing from its marker: the default it had then, not a change
    marker = json.loads((a_cv / ".cornpipe-cv").read_text())
    for key in ("jitter", "oversample_by"):
        del marker["config"][key]
    (a_cv / ".cornpipe-cv").write_text(json.dumps(marker))
    (a_cv / "fold1-seed0" / "cv_result.json").unlink()
    result = cli_run("cv", tiny_shards, "--out", a_cv, "--folds", "2", *TINY)
    assert result.exit_code == 0, result.output
    assert "fold0-seed0: finished earlier, skipped" in result.output
    changed = cli_run("cv", tiny_shards, "--out", a_cv, "--folds", "2", *TINY, "--jitter", "0.1")
    assert "another config (jitter 0.2 -> 0.1)" in error_line(changed)  # a real change is still refused


def test_cv_into_a_folder_cornpipe_did_not_make_is_refused(tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.md").write_text("mine")
    result = cli_run("cv", tiny_shards, "--out", out, "--folds", "2", *TINY, "--force")
    assert result.exit_code == 1
    assert error_line(result).startswith(f"Error: {out} is not a cv folder cornpipe made")
    assert [p.name for p in out.iterdir()] == ["chapter1.md"]


def test_a_second_cv_into_the_same_folder_is_refused(a_cv: Path, tiny_shards: Path) -> None:
    with FolderLock(a_cv, "cv", print):
        result = cli_run("cv", tiny_shards, "--out", a_cv, "--folds", "2", *TINY)
    assert result.exit_code == 1
    assert error_line(result).startswith(f"Error: {a_cv} is in use by another cornpipe cv (pid {os.getpid()} ")


def test_intervals_stay_inside_the_metrics_range() -> None:
    acc = interval([0.0, 0.6, 0.0, 0.0, 0.4], "position_accuracy")
    assert acc["ci95"][0] == 0.0 and acc["ci95"][1] <= 1.0
    assert interval([0.1, 3.0, 0.2], "grade_mae")["ci95"][0] == 0.0
    rows = [{"fold": i, "seed": 0, "val": {"position_accuracy": a, "position_recall": {"lower": a}}}
            for i, a in enumerate([1.0, 1.0, 0.0])]
    summary = summarize_runs(rows, ["lower"])
    for m in (summary["metrics"]["position_accuracy"], summary["position_recall"]["lower"]):
        assert 0.0 <= m["ci95"][0] <= m["ci95"][1] <= 1.0


def test_cv_warns_when_folds_are_too_small_to_mean_anything(tmp_path: Path) -> None:
    """`cv --folds 5` on 3 images per class: every fold misses a class or nearly."""
    samples = [{"id": i, "position": i % 3, "grade": 0.0, "stage": 9, "source": "9l"} for i in range(9)]
    base = TrainConfig(shards=str(tmp_path), out=str(tmp_path / "cv"), folds=5)
    lines: list[str] = []

    class Stop(Exception):
        pass

    def train_fn(*args: object, **kwargs: object) -> None:
        raise Stop

    with pytest.raises(Stop):
        run_folds(base, tmp_path / "cv", samples, [0], train_fn, lines.append)
    warning = next(line for line in lines if line.startswith("WARNING"))
    assert warning.startswith("WARNING: 5 of 5 folds are too small for their metrics to mean much")
    assert "fold 1/5 validates on 2 sample(s)" in warning


def test_no_warning_for_folds_of_a_reasonable_size(tmp_path: Path) -> None:
    from cornpipe.runs.cv_dir import small_folds

    positions = np.arange(300) % 3
    fold = np.arange(300) % 5
    assert small_folds(fold, positions, [f"fold {i + 1}/5" for i in range(5)]) == []
