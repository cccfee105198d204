"""What a user watches while training: one line per epoch, the full table once at the end (every epoch
with --verbose). 14 epochs used to print ~300 lines of tables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from cornpipe.cli import cli
from cornpipe.runs.report import format_epoch_line

EPOCH_LINE = re.compile(r"^epoch (\d+)/3  lr \S+  loss \S+/\S+  val acc \S+ F1 \S+ MAE \S+  \S+ img/s  wait \S+%")


def _train(shards: Path, out: Path, *extra: str) -> str:
    result = CliRunner().invoke(cli, ["train", str(shards), "--out", str(out), "--model", "resnet_plus_tiny",
                                      "--image-size", "32", "--batch-size", "8", "--epochs", "3",
                                      "--max-batches", "2", "--workers", "0", "--bootstrap", "0", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def test_one_line_per_epoch_then_one_table(tiny_shards: Path, tmp_path: Path) -> None:
    out = _train(tiny_shards, tmp_path / "run")
    lines = [line for line in out.splitlines() if EPOCH_LINE.match(line)]
    assert [EPOCH_LINE.match(line).group(1) for line in lines] == ["1", "2", "3"]
    assert "  * best" in lines[0]  # epoch 1 is always the first best
    assert out.count("Epoch ") == 1 and "Epoch 3" in out  # the last epoch's full table, once
    assert len(out.splitlines()) < 60


def test_verbose_prints_the_table_every_epoch(tiny_shards: Path, tmp_path: Path) -> None:
    out = _train(tiny_shards, tmp_path / "run", "--verbose")
    assert [n for n in ("Epoch 1", "Epoch 2", "Epoch 3") if n in out] == ["Epoch 1", "Epoch 2", "Epoch 3"]
    assert not any(EPOCH_LINE.match(line) for line in out.splitlines())


@pytest.mark.parametrize("best", [True, False])
def test_the_line_names_every_number_the_team_reads(best: bool) -> None:
    record = {"epoch": 4, "lr": 1e-3, "best": best,
              "train": {"loss": 0.81234, "images_per_s": 1234.5, "data_wait_share": 0.043},
              "val": {"loss": 0.9, "position_accuracy": 0.8125, "position_macro_f1": 0.79, "grade_mae": 1.234,
                      "never_predicted": ["upper"]}}
    line = format_epoch_line(record, 14)
    assert line.startswith("epoch 4/14  lr 1.0e-03  loss 0.812/0.900  val acc 0.812 F1 0.790 MAE 1.23  "
                           "1,234 img/s  wait 4%")
    assert line.endswith("(never predicted: upper)")
    assert ("* best" in line) is best
