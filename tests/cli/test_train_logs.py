"""A training run a person follows in a log (no TTY, as under nohup or CI): progress lines with counts while
an epoch runs, "resuming at epoch N of M" on resume, paths never broken at 80 columns, and the results on
stdout apart from the diagnostics on stderr (click's CliRunner is not a terminal and keeps the two apart)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from cornpipe.cli import cli

TRAIN_LINE = re.compile(r"^train 1/2: (\d+)/3 batches \((\d+) %\)(, [\d.,]+ img/s)?(, ETA .+)?$")


def _train(*args: object) -> object:
    result = CliRunner().invoke(cli, ["train", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def logged_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    """A 2-epoch tiny run under a long path, then resumed for a third epoch."""
    deep = tmp_path_factory.mktemp("logs") / ("a_rather_long_folder_name_for_a_survey_" * 2) / "run"
    common = ["--model", "resnet_plus_tiny", "--image-size", "32", "--batch-size", "8", "--max-batches", "3",
              "--workers", "0", "--device", "cpu", "--bootstrap", "0", "--threads", "1"]
    first = _train(tiny_shards, "--out", deep, "--epochs", "2", *common)
    resumed = _train("--resume", deep, "--epochs", "3")
    return deep, first, resumed


def test_progress_lines_count_the_batches_of_an_epoch(logged_run: tuple[Path, object, object]) -> None:
    _, first, _ = logged_run
    counts = [int(m.group(1)) for m in map(TRAIN_LINE.match, first.stderr.splitlines()) if m]
    assert counts == [1, 2, 3]  # every batch is over 10 % of 3
    assert "train 1/2: 3/3 batches (100 %)" in first.stderr
    assert "img/s" in first.stderr


def test_a_resumed_run_says_where_it_resumes(logged_run: tuple[Path, object, object]) -> None:
    run, first, resumed = logged_run
    assert "resuming at epoch" not in first.stderr
    assert f"resuming at epoch 3 of 3 (after {run / 'last.pt'})" in resumed.stderr.splitlines()
    assert re.search(r"^train 3/3: 3/3 batches", resumed.stderr, re.M)


def test_no_line_breaks_a_long_path(logged_run: tuple[Path, object, object]) -> None:
    run, first, resumed = logged_run
    assert len(str(run)) > 80
    for result in (first, resumed):
        lines = result.output.splitlines()
        touching = [ln for ln in lines if "a_rather_long_folder" in ln or ln.strip().startswith(run.name)]
        assert touching and all(str(run) in ln for ln in touching), "\n".join(touching)


def test_results_on_stdout_diagnostics_on_stderr(logged_run: tuple[Path, object, object]) -> None:
    run, first, _ = logged_run
    assert any(line.startswith(f"report: {run / 'report.md'}") for line in first.stdout.splitlines())  # whole
    assert re.search(r"^best epoch \d of 2", first.stdout, re.M)
    for diagnostic in ("training resnet_plus_tiny", "checked ", "train 1/2:"):
        assert diagnostic in first.stderr and diagnostic not in first.stdout
    assert "threads 1" in first.stderr and "channels_last" in first.stderr  # the start line says what was chosen
