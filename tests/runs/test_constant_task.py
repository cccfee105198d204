"""A task whose train labels are constant: named at the start, its loss weight dropped to 0 (unless the user
set the weights), the default monitor follows the other task; and validation is never capped by --max-batches."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import cli_run, shards_from_csv

from cornpipe.runs.early_stopping import monitor_value
from cornpipe.shards.shard_set import ShardSet

TINY_ARGS = ["--model", "resnet_plus_tiny", "--image-size", "32", "--batch-size", "8", "--workers", "0",
             "--device", "cpu", "--loader", "torch", "--bootstrap", "0", "--no-verify"]
METRICS = {"position_macro_f1": 0.6, "grade_mae": 1.8}


@pytest.fixture(scope="module")
def grade_zero_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """18 images, every grade 0 (a survey of healthy leaves), positions l/m/t in turn."""
    return shards_from_csv(tmp_path_factory.mktemp("gradezero"), "path,position,grade",
                           [f"img{i:02d}.jpg,{'lmt'[i % 3]},0" for i in range(18)])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_combined_monitor_ignores_a_constant_task() -> None:
    scale = [0.0, 3.0, 5.0, 7.0, 9.0]
    assert monitor_value(METRICS, "combined", scale) == pytest.approx(0.6 - 1.8 / 9)
    assert monitor_value(METRICS, "combined", scale, ignore=("grade",)) == pytest.approx(0.6)
    assert monitor_value(METRICS, "combined", scale, ignore=("position",)) == pytest.approx(-1.8)
    assert monitor_value(METRICS, "grade_mae", scale, ignore=("grade",)) == pytest.approx(-1.8)  # chosen: kept


def test_a_constant_grade_is_named_weighted_0_and_left_out_of_the_monitor(grade_zero_shards: Path,
                                                                          tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = cli_run("train", grade_zero_shards, "--out", run, *TINY_ARGS, "--epochs", "2")
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "constant in the train split" in line]
    assert len(said) == 1 and "grade" in said[0] and "weight" in said[0] and "0" in said[0], result.output
    config = json.loads((run / "config.json").read_text())
    assert config["loss_weights"] == [0.7, 0.0]
    assert config["data"]["tasks"] == {"constant": ["grade"], "loss_weights": [0.7, 0.0], "weights_from": "data",
                                       "monitor_ignores": ["grade"]}
    for record in records(run):
        assert record["monitor"] == pytest.approx(record["val"]["position_macro_f1"])
        assert record["train"]["loss"] == pytest.approx(0.7 * record["train"]["position_loss"], rel=1e-4)
    # a resume keeps what the first start decided
    resumed = cli_run("train", "--resume", run, "--epochs", "3")
    assert resumed.exit_code == 0, resumed.output
    again = json.loads((run / "config.json").read_text())
    assert again["data"]["tasks"] == config["data"]["tasks"] and again["loss_weights"] == [0.7, 0.0]
    assert records(run)[-1]["monitor"] == pytest.approx(records(run)[-1]["val"]["position_macro_f1"])
    report = (run / "report.md").read_text()
    assert "grade is constant in the train split" in report and "weight 0" in report, report


def test_weights_the_user_set_are_kept_for_a_constant_task(grade_zero_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = cli_run("train", grade_zero_shards, "--out", run, *TINY_ARGS, "--epochs", "1",
                     "--loss-weights", "0.5,0.5")
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "constant in the train split" in line]
    assert len(said) == 1 and "0.5,0.5" in said[0], result.output
    config = json.loads((run / "config.json").read_text())
    assert config["loss_weights"] == [0.5, 0.5] and config["data"]["tasks"]["weights_from"] == "user"
    (record,) = records(run)
    assert record["monitor"] == pytest.approx(record["val"]["position_macro_f1"])


def test_a_task_that_varies_changes_nothing(tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = cli_run("train", tiny_shards, "--out", run, *TINY_ARGS, "--epochs", "1", "--max-batches", "1")
    assert result.exit_code == 0, result.output
    assert "constant in the train split" not in result.output
    config = json.loads((run / "config.json").read_text())
    assert config["loss_weights"] == [0.7, 0.3] and config["data"]["tasks"]["constant"] == []


def val_rows(run: Path) -> int:
    with (run / "val_predictions.csv").open(newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def test_max_batches_caps_training_only(tiny_shards: Path, tmp_path: Path) -> None:
    n_val = ShardSet(tiny_shards).count("val")
    assert n_val > 8  # more than one val batch: a cap would show
    run = tmp_path / "run"
    result = cli_run("train", tiny_shards, "--out", run, *TINY_ARGS, "--epochs", "1", "--max-batches", "1")
    assert result.exit_code == 0, result.output
    assert val_rows(run) == n_val and records(run)[0]["val"]["n_samples"] == n_val
    capped = tmp_path / "capped"
    result = cli_run("train", tiny_shards, "--out", capped, *TINY_ARGS, "--epochs", "1", "--max-batches", "1",
                     "--max-val-batches", "1")
    assert result.exit_code == 0, result.output
    assert val_rows(capped) == 8


def test_the_help_says_what_each_cap_caps() -> None:
    text = " ".join(cli_run("train", "--help").output.split())
    assert "--max-batches" in text and "training only" in text
    assert "--max-val-batches" in text


def test_one_position_class_only_leaves_the_grade_to_the_monitor() -> None:
    from cornpipe.runs.tasks import plan_tasks

    plan, lines = plan_tasks(None, [1, 1, 1, 1], [0, 3, 5, 3], ["lower", "middle", "upper"])
    assert plan.constant == ("position",) and plan.loss_weights == (0.0, 0.3) and plan.weights_from == "data"
    assert plan.monitor_ignores == ("position",)
    assert len(lines) == 1 and "every image is middle" in lines[0] and "grade MAE" in lines[0]
    # both constant: said, and nothing changed (there is no other task to follow)
    plan, lines = plan_tasks(None, [1, 1], [0, 0], ["lower", "middle", "upper"])
    assert plan.loss_weights == (0.7, 0.3) and plan.monitor_ignores == () and len(lines) == 1
