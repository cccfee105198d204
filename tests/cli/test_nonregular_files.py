"""Named pipes, folders and devices where cornpipe reads a file (issue 26, "Hangs"): each is one
`Error:` line or a rejection naming what the path is, never a command that blocks with no output, and
a shard that turns into a folder mid-training is one line, not a DataLoader worker's traceback."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
from conftest import cli_run, error_line, jpeg_bytes

from cornpipe.errors import LoaderError
from cornpipe.loaders import make_loader
from cornpipe.loaders.base import IMAGENET
from cornpipe.shards import fields as F
from cornpipe.shards.shard_set import ShardSet

pytestmark = pytest.mark.timeout(120)  # a regression here is a hang: fail it instead
run = cli_run
TINY = ("--model", "resnet_plus_tiny", "--image-size", 32, "--batch-size", 8, "--loader", "torch",
        "--epochs", 1, "--device", "cpu", "--bootstrap", 0)


def _copy_with_fifo(tiny_shards: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    (copy / name).unlink()
    os.mkfifo(copy / name)
    return copy


@pytest.mark.parametrize("command", [("inspect",), ("verify",), ("train", "--no-verify"), ("train",)])
def test_manifest_json_as_a_fifo(tiny_shards: Path, tmp_path: Path, command: tuple[str, ...]) -> None:
    shards = _copy_with_fifo(tiny_shards, tmp_path, F.MANIFEST)
    extra = ("--out", tmp_path / "run", *TINY) if command[0] == "train" else ()
    result = run(command[0], shards, *command[1:], *extra)
    assert result.exit_code == 1
    assert error_line(result) == f"Error: {shards / F.MANIFEST} is not a regular file (named pipe)"


@pytest.mark.parametrize("name", ["train-000000.tar", "val-000000.idx"])
@pytest.mark.parametrize("command", [("verify",), ("train", "--no-verify"), ("train",)])
def test_a_shard_file_as_a_fifo(tiny_shards: Path, tmp_path: Path, name: str, command: tuple[str, ...]) -> None:
    shards = _copy_with_fifo(tiny_shards, tmp_path, name)
    extra = ("--out", tmp_path / "run", *TINY) if command[0] == "train" else ()
    result = run(command[0], shards, *command[1:], *extra)
    assert result.exit_code == 1
    assert f"{shards / name} is not a regular file (named pipe)" in error_line(result)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_tar_turned_into_a_folder_mid_training_is_one_line(tiny_shards: Path, tmp_path: Path) -> None:
    """The tar is read by DataLoader workers: their error comes back as one LoaderError naming it."""
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    loader = make_loader(ShardSet(copy), "train", "torch", batch_size=8, image_size=32, workers=2,
                         device="cpu", normalization=IMAGENET)
    assert sum(len(b.position) for b in loader) > 0  # epoch 1 reads the tar
    tar = copy / "train-000000.tar"
    tar.unlink()
    tar.mkdir()
    with pytest.raises(LoaderError, match=f"^shard {tar} is not a regular file \\(folder\\)$"):
        for _ in loader:
            pass


def test_a_val_tar_replaced_by_a_fifo_after_the_check_is_one_line(tiny_shards: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    val = copy / "val-000000.tar"
    real_init = ShardSet.__init__

    def swap_after_open(self: ShardSet, root: Path | str) -> None:  # the swap lands after every check
        real_init(self, root)
        if val.is_file():
            val.unlink()
            os.mkfifo(val)

    monkeypatch.setattr(ShardSet, "__init__", swap_after_open)
    result = run("train", copy, "--no-verify", "--out", tmp_path / "run", *TINY, "--workers", 0)
    assert result.exit_code == 1
    assert error_line(result) == f"Error: shard {val} is not a regular file (named pipe)"


@pytest.fixture(scope="module")
def checkpoint(trained_run: Path) -> Path:
    return trained_run / "best.pt"


def test_predict_with_a_fifo_among_its_images(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(0, size=64))
    os.mkfifo(tmp_path / "pipe.jpg")
    os.mkfifo(tmp_path / os.fsdecode(b"caf\xe9.jpg"))  # not UTF-8, and a pipe: both said, nothing blocks
    (tmp_path / os.fsdecode(b"na\xefve.jpg")).write_bytes(jpeg_bytes(1, size=64))
    out = tmp_path / "preds.csv"
    result = run("predict", checkpoint, tmp_path / "a.jpg", tmp_path / "pipe.jpg",
                 tmp_path / os.fsdecode(b"caf\xe9.jpg"), tmp_path / os.fsdecode(b"na\xefve.jpg"),
                 "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "predicted 2 image(s), 2 unreadable" in result.output
    with open(out, newline="", encoding="utf-8") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert rows["pipe.jpg"]["error"] == "not a regular file (named pipe)"
    assert rows["caf\\xe9.jpg"]["error"] == "not a regular file (named pipe)"
    assert rows["na\\xefve.jpg"]["error"] == "" and rows["na\\xefve.jpg"]["position_pred"]
    assert rows["a.jpg"]["error"] == ""


def test_convert_rejects_a_fifo_image_and_refuses_a_fifo_csv(tmp_path: Path) -> None:
    folder = tmp_path / "survey"
    folder.mkdir()
    for i in range(4):
        (folder / f"u{i}.jpg").write_bytes(jpeg_bytes(i))
    os.mkfifo(folder / "pipe.jpg")
    lines = [f"u{i}.jpg,{'lmt'[i % 3]},3" for i in range(4)] + ["pipe.jpg,lower,0"]
    (folder / "labels.csv").write_text("path,position,grade\n" + "".join(f"{ln}\n" for ln in lines))
    out = tmp_path / "out"
    result = run("convert", "--manifest", folder / "labels.csv", out, "--formats", "wds", "--workers", 1,
                 "--max-resolution", 32)
    assert result.exit_code == 0, result.output
    with open(out / F.REJECTED, newline="", encoding="utf-8") as f:
        assert [(r["path"], r["reason"]) for r in csv.DictReader(f)] == [
            ("pipe.jpg", "not a regular file (named pipe)")]
    os.mkfifo(folder / "pipe.csv")
    result = run("convert", "--manifest", folder / "pipe.csv", tmp_path / "out2", "--formats", "wds")
    assert result.exit_code == 1
    assert error_line(result) == f"Error: manifest {folder / 'pipe.csv'} is not a regular file (named pipe)"
