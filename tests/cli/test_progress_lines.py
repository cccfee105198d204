"""In a log (no TTY) `convert` and `cv` say how far they are: a plain line whenever 10 s or 10 % of the
work have passed, whichever first. `convert` used to print nothing until it ended."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner
from conftest import SHARDS_MAX_RESOLUTION

from cornpipe.cli import cli
from cornpipe.cli.progress import ProgressLines

CONVERT_LINE = re.compile(r"^convert: (\d+)/54 images \((\d+) %\), [\d.,]+ img/s(, ETA \d+ s)?$")
CV_LINE = re.compile(r"^cv: (\d+)/2 epochs \((\d+) %\)")


def test_convert_prints_counted_lines_without_a_tty(synth_raw: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["convert", str(synth_raw), str(tmp_path / "out"), "--formats", "wds",
                                      "--workers", "1", "--max-resolution", str(SHARDS_MAX_RESOLUTION)])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0] == "convert: decoding 54 images"
    counts = [int(m.group(1)) for m in map(CONVERT_LINE.match, lines) if m]
    assert counts[-1] == 54 and "54/54 images (100 %)" in result.stderr
    steps = [b - a for a, b in zip([0, *counts], counts, strict=False)]
    assert len(counts) >= 9 and max(steps) <= 6  # a line at least every 10 % (5.4 images)
    assert "convert: writing train shards" in lines and "convert: hashing" in lines


def test_a_line_every_ten_seconds_when_ten_percent_takes_longer() -> None:
    now = [0.0]
    said: list[str] = []
    lines = ProgressLines("convert", "images", "img", said.append, clock=lambda: now[0])
    lines.start(1000)
    for second in range(1, 31):  # 2 images a second: 10 % would take 50 s
        now[0] = float(second)
        lines.update(2 * second)
    assert said == ["convert: 20/1,000 images (2 %), 2.0 img/s, ETA 8 min",
                    "convert: 40/1,000 images (4 %), 2.0 img/s, ETA 8 min",
                    "convert: 60/1,000 images (6 %), 2.0 img/s, ETA 8 min"]


def test_a_line_every_ten_percent_and_one_at_the_end() -> None:
    said: list[str] = []
    lines = ProgressLines("convert", "images", "img", said.append, clock=lambda: 0.0)
    lines.start(25)
    for done in range(1, 26):
        lines.update(done)
    assert [line.split(" images")[0] for line in said] == [
        "convert: 3/25", "convert: 6/25", "convert: 9/25", "convert: 12/25", "convert: 15/25", "convert: 18/25",
        "convert: 21/25", "convert: 24/25", "convert: 25/25"]


def test_cv_prints_its_epochs_done_without_a_tty(tiny_shards: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["cv", str(tiny_shards), "--out", str(tmp_path / "cv"), "--folds", "2",
                                      "--model", "resnet_plus_tiny", "--image-size", "32", "--batch-size", "16",
                                      "--max-batches", "1", "--workers", "0", "--epochs", "1", "--device", "cpu",
                                      "--bootstrap", "0"])
    assert result.exit_code == 0, result.output
    counts = [(int(m.group(1)), int(m.group(2))) for m in map(CV_LINE.match, result.stderr.splitlines()) if m]
    assert counts == [(1, 50), (2, 100)], result.stderr
