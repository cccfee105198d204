"""--resume continues a run on the data it was trained on: another shard set is refused unless the
user says it is meant, and then the report says so (issue 13, item 11)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FORMATS

from cornpipe.cli import cli

TRAIN = ["--model", "resnet_plus_tiny", "--image-size", "32", "--batch-size", "8", "--max-batches", "1",
         "--workers", "0", "--bootstrap", "0"]


@pytest.fixture(scope="module")
def other_shards(synth_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same survey split differently: other counts, another manifest."""
    from cornpipe.shards.convert import convert_dataset

    out = tmp_path_factory.mktemp("other") / "shards"
    convert_dataset(synth_raw, out, max_resolution=64, val_fraction=0.4, workers=1, seed=3, formats=FORMATS)
    return out


def test_resume_on_another_shard_set_is_refused_then_recorded(tiny_shards: Path, other_shards: Path,
                                                              tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = CliRunner().invoke(cli, ["train", str(tiny_shards), "--out", str(run), "--epochs", "1", *TRAIN])
    assert first.exit_code == 0, first.output

    same = CliRunner().invoke(cli, ["train", str(tiny_shards), "--resume", str(run), "--epochs", "2"])
    assert same.exit_code == 0, same.output  # its own shard set: no question asked

    refused = CliRunner().invoke(cli, ["train", str(other_shards), "--resume", str(run), "--epochs", "3"])
    assert refused.exit_code == 1
    (line,) = [x for x in refused.output.splitlines() if x.startswith("Error:")]
    assert f"{other_shards} is not the shard set {run} was trained on (manifest sha256 " in line
    assert line.endswith("pass --allow-new-shards to continue on it anyway")
    assert "train/val 43/11 -> " in line

    allowed = CliRunner().invoke(cli, ["train", str(other_shards), "--resume", str(run), "--epochs", "3",
                                       "--allow-new-shards"])
    assert allowed.exit_code == 0, allowed.output
    report = (run / "report.md").read_text()
    assert "**Resumed after epoch 2 on another shard set**" in report
