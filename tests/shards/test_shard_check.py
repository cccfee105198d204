"""`train` checks its shard set before the first epoch: flipped bytes and an edited label do not train
silently (issue 13, item 10); `--no-verify` skips the check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cornpipe.cli import cli
from cornpipe.errors import VerifyError
from cornpipe.shards.inspect import check_shards

TRAIN = ["--model", "resnet_plus_tiny", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
         "--max-batches", "1", "--workers", "0", "--bootstrap", "0"]


@pytest.fixture()
def shards(tiny_shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    return copy


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only a hash can tell
    path.write_bytes(bytes(data))


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
    return line


def test_flipped_bytes_in_a_tar_stop_train_before_the_first_epoch(shards: Path, tmp_path: Path) -> None:
    tar = sorted(shards.glob("train-*.tar"))[0]
    _flip_a_byte(tar)
    result = CliRunner().invoke(cli, ["train", str(shards), "--out", str(tmp_path / "run"), *TRAIN])
    assert _error_line(result) == (f"Error: {tar} is damaged (sha256 mismatch); run `cornpipe verify` or "
                                   f"convert again")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_edited_label_in_the_manifest_is_caught_and_no_verify_skips_the_check(shards: Path,
                                                                                 tmp_path: Path) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["samples"][0]["grade"] = 9 if manifest["samples"][0]["grade"] != 9 else 0
    (shards / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(cli, ["train", str(shards), "--out", str(tmp_path / "run"), *TRAIN])
    assert "manifest.json was changed after convert" in _error_line(result)
    skipped = CliRunner().invoke(cli, ["train", str(shards), "--out", str(tmp_path / "run2"), *TRAIN,
                                       "--no-verify"])
    assert skipped.exit_code == 0, skipped.output
    with pytest.raises(VerifyError, match="manifest.json was changed"):
        check_shards(shards)  # and verify says the same
    result = CliRunner().invoke(cli, ["verify", str(shards)])
    assert "manifest.json was changed after convert" in _error_line(result)


def test_over_the_hash_limit_only_sizes_are_checked(shards: Path) -> None:
    tar = sorted(shards.glob("val-*.tar"))[0]
    _flip_a_byte(tar)
    assert check_shards(shards, hash_limit_bytes=0)["hashed"] is False  # same size: not seen without hashing
    with tar.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(VerifyError, match=r"is damaged \(\d+ bytes, manifest says \d+\)"):
        check_shards(shards, hash_limit_bytes=0)
