"""`cornpipe train --log tensorboard` (issue 23 item 4): TensorBoard shows the numbers metrics.jsonl holds,
and a missing tensorboard package is one `Error:` line naming the extra, before any work."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import cli_run, error_line

pytest.importorskip("tensorboard")  # the `tensorboard` extra (in dev)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from cornpipe.runs.tracking import TENSORBOARD_DIR  # noqa: E402

TINY = ["--model", "resnet_plus_tiny", "--image-size", "32", "--batch-size", "16", "--max-batches", "2",
        "--workers", "0", "--epochs", "1", "--device", "cpu", "--bootstrap", "0", "--no-verify"]


def logged(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run / TENSORBOARD_DIR))
    events.Reload()
    return events


def test_tensorboard_scalars_equal_metrics_jsonl_and_force_starts_afresh(tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = cli_run("train", tiny_shards, "--out", run, *TINY, "--log", "tensorboard")
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = logged(run)
    expected = {"lr": record["lr"], "time_s": record["time_s"]}
    for split in ("train", "val"):
        for key in ("loss", "position_loss", "grade_loss", "position_accuracy", "position_macro_f1", "grade_mae",
                    "images_per_s"):
            expected[f"{split}/{key}"] = record[split][key]
    for tag, value in expected.items():
        (scalar,) = events.Scalars(tag)
        assert scalar.step == 1
        assert scalar.value == pytest.approx(value, rel=1e-6), tag  # TensorBoard keeps float32
    assert [image.step for image in events.Images("val/confusion")] == [1]

    # --force: the earlier run's curves do not linger beside the new run's
    result = cli_run("train", tiny_shards, "--out", run, *TINY, "--log", "tensorboard", "--force", "--lr", "0.01")
    assert result.exit_code == 0, result.output
    assert len(list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1
    (scalar,) = logged(run).Scalars("lr")
    assert scalar.value == pytest.approx(json.loads((run / "metrics.jsonl").read_text())["lr"], rel=1e-6)


def test_missing_tensorboard_is_one_error_line_before_any_work(tiny_shards: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "tensorboard" else real(name, *args))
    run = tmp_path / "run"
    result = cli_run("train", tiny_shards, "--out", run, *TINY, "--log", "tensorboard")
    assert result.exit_code == 1
    assert "pip install 'cornpipe[tensorboard]'" in error_line(result)
    assert not run.exists()


def test_an_unknown_logger_is_refused_by_the_cli(tiny_shards: Path, tmp_path: Path) -> None:
    result = cli_run("train", tiny_shards, "--out", tmp_path / "run", "--log", "wandb")
    assert result.exit_code == 2 and "'wandb' is not one of 'none', 'tensorboard'" in result.output
