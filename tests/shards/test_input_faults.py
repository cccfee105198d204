"""Inputs that were silently wrong or ended in a traceback (issue 26, the input side): a shard check
skipped by deleting its evidence, a manifest CSV naming a file twice with other labels or a column
twice, 16-bit colour stored near-black, file names that are not UTF-8, paths no file system takes.
Each is a rejection with its reason or one `Error:` line, and every input stays accounted for."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import as_format_version_1, cli_run, error_line, jpeg_bytes

from cornpipe.errors import VerifyError
from cornpipe.shards import fields as F
from cornpipe.shards.imageio import prepare_image
from cornpipe.shards.inspect import check_shards, inspect_shards

run = cli_run


def rejected_rows(out: Path) -> list[tuple[str, str]]:
    with open(out / F.REJECTED, newline="", encoding="utf-8") as f:
        return [(r["path"], r["reason"]) for r in csv.DictReader(f)]


def counts(out: Path) -> dict:
    return json.loads((out / F.MANIFEST).read_text(encoding="utf-8"))["counts"]


# --------------------------------------------------------------------------- the shard check's own evidence

def test_deleting_manifest_sha256_does_not_skip_the_check(tiny_shards: Path, tmp_path: Path) -> None:
    """20 labels edited in manifest.json and manifest.sha256 deleted: train and verify refuse the set."""
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    m = json.loads((copy / F.MANIFEST).read_text())
    for s in m["samples"][:20]:
        s["position"] = (s["position"] + 1) % 3
    (copy / F.MANIFEST).write_text(json.dumps(m))
    (copy / F.MANIFEST_HASH).unlink()

    with pytest.raises(VerifyError, match="manifest.sha256 is missing"):
        check_shards(copy)
    result = run("train", copy, "--out", tmp_path / "run", "--model", "resnet_plus_tiny", "--image-size", 32,
                 "--batch-size", 8, "--loader", "torch", "--epochs", 1, "--device", "cpu")
    assert result.exit_code == 1
    assert error_line(result).startswith(f"Error: {copy / F.MANIFEST_HASH} is missing")
    assert "checked" not in result.output
    assert not (tmp_path / "run" / "last.pt").exists()
    result = run("verify", copy)
    assert result.exit_code == 1 and "manifest.sha256 is missing" in error_line(result)


def test_a_version_1_set_from_before_manifest_sha256_says_what_was_not_checked(tiny_shards: Path,
                                                                              tmp_path: Path) -> None:
    old = as_format_version_1(tiny_shards, tmp_path / "v1")
    (old / F.MANIFEST_HASH).unlink()
    checked = check_shards(old)
    assert checked["manifest_hashed"] is False and checked["hashed"] is True
    (old / "train-000000.tar").write_bytes(b"edited")  # the file hashes inside the manifest still hold
    with pytest.raises(VerifyError, match="train-000000.tar is damaged"):
        check_shards(old)


# --------------------------------------------------------------------------- a manifest CSV's rows and columns

def _manifest_survey(tmp_path: Path, lines: list[str], header: str = "path,position,grade") -> Path:
    folder = tmp_path / "survey"
    folder.mkdir(exist_ok=True)
    for i in range(6):
        (folder / f"u{i}.jpg").write_bytes(jpeg_bytes(10 + i))
    (folder / "twice.jpg").write_bytes(jpeg_bytes(1))
    rows = [f"u{i}.jpg,{'lmt'[i % 3]},{3 * (i % 2)}" for i in range(6)] + lines
    (folder / "labels.csv").write_text(header + "\n" + "".join(f"{r}\n" for r in rows))
    return folder / "labels.csv"


def test_a_path_listed_twice_with_other_labels_rejects_every_copy(tmp_path: Path) -> None:
    csv_path = _manifest_survey(tmp_path, ["twice.jpg,lower,0", "twice.jpg,upper,5"])
    out = tmp_path / "out"
    result = run("convert", "--manifest", csv_path, out, "--formats", "wds", "--workers", 1,
                 "--max-resolution", 32)
    assert result.exit_code == 0, result.output
    conflict = ("identical bytes, conflicting labels: twice.jpg (line 8) is lower grade 0, "
                "twice.jpg (line 9) is upper grade 5")
    assert rejected_rows(out) == [("twice.jpg", conflict), ("twice.jpg", conflict)]
    assert "converted 6 + rejected 2 = found 8" in result.output
    assert counts(out)["converted"] + counts(out)["rejected"] == counts(out)["found"] == 8
    assert [r["path"] for r in inspect_shards(out)["conflicting_duplicates"]] == ["twice.jpg", "twice.jpg"]


def test_a_path_listed_twice_with_the_same_labels_keeps_one(tmp_path: Path) -> None:
    csv_path = _manifest_survey(tmp_path, ["twice.jpg,lower,0", "twice.jpg,l,0"])
    out = tmp_path / "out"
    result = run("convert", "--manifest", csv_path, out, "--formats", "wds", "--workers", 1,
                 "--max-resolution", 32)
    assert result.exit_code == 0, result.output
    assert rejected_rows(out) == [("twice.jpg", "listed again in labels.csv (line 9; first on line 8)")]
    assert "converted 7 + rejected 1 = found 8" in result.output


def test_a_duplicated_column_name_is_an_error(tmp_path: Path) -> None:
    csv_path = _manifest_survey(tmp_path, [], header="path,position,grade,Grade")
    out = tmp_path / "out"
    result = run("convert", "--manifest", csv_path, out, "--formats", "wds", "--workers", 1)
    assert result.exit_code == 1
    assert error_line(result) == ("Error: labels.csv names the column 'grade' twice (columns 3 and 4); "
                                  "keep one")
    assert not out.exists()


# --------------------------------------------------------------------------- 16-bit images: one rule

def _png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG of a (H, W) or (H, W, 3) uint16 array (big-endian samples, filter 0), no OpenCV."""
    h, w = array.shape[:2]
    color = 2 if array.ndim == 3 else 0
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_rgb_and_grey_follow_one_rule() -> None:
    """Values 1000..5000: grey was stretched to 0..255, RGB kept the high byte (pixels 3..19)."""
    grey = np.random.default_rng(0).integers(1000, 5001, (24, 32)).astype(np.uint16)
    grey[0, 0], grey[0, 1] = 1000, 5000
    as_grey = prepare_image(_png16(grey), max_resolution=64)
    as_rgb = prepare_image(_png16(np.repeat(grey[:, :, None], 3, axis=2)), max_resolution=64)
    assert as_rgb.pixels.min() == 0 and as_rgb.pixels.max() == 255
    np.testing.assert_array_equal(as_rgb.pixels, as_grey.pixels)
    colour = np.stack([grey, grey // 2, grey // 4], axis=2)  # one stretch over all bands keeps the hue
    pixels = prepare_image(_png16(colour), max_resolution=64).pixels.astype(int)
    assert pixels[..., 0].max() == 255 and (pixels[..., 0] >= pixels[..., 1]).all()


def test_the_16_bit_rule_is_recorded_in_the_manifest(tiny_shards: Path) -> None:
    params = json.loads((tiny_shards / F.MANIFEST).read_text())["params"]
    assert params["high_bit_depth"].startswith("stretch")


# --------------------------------------------------------------------------- names and paths

def test_a_labels_csv_that_is_a_fifo_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "9l").mkdir(parents=True)
    (src / "9l" / "a.jpg").write_bytes(jpeg_bytes(0))
    os.mkfifo(src / "9l" / "labels.csv")
    result = run("convert", src, tmp_path / "out", "--formats", "wds", "--workers", 1)
    assert result.exit_code == 1
    assert error_line(result) == "Error: 9l/labels.csv is not a regular file (named pipe)"


def _grade_folder_survey(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for i in range(6):
        folder = src / ["9l", "9m", "9t"][i % 3] / "3"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"u{i}.jpg").write_bytes(jpeg_bytes(20 + i))
    return src


def test_a_file_name_that_is_not_utf8_is_rejected_with_its_reason(tmp_path: Path) -> None:
    src = _grade_folder_survey(tmp_path)
    (src / "9l" / "3").joinpath(os.fsdecode(b"caf\xe9.jpg")).write_bytes(jpeg_bytes(3))
    out = tmp_path / "out"
    result = run("convert", src, out, "--formats", "wds", "--workers", 1, "--max-resolution", 32)
    assert result.exit_code == 0, result.output
    assert rejected_rows(out) == [("9l/3/caf\\xe9.jpg", "file name is not valid UTF-8 (rename the file)")]
    assert counts(out)["found"] == 7 and counts(out)["converted"] == 6


@pytest.mark.parametrize("cell, reason", [
    ("a\x00b.jpg", "path has a NUL byte"),
    ("x" * 5000 + ".jpg", "path too long for the file system"),
    ("/".join(["d" * 200] * 30) + "/p.jpg", "path too long for the file system"),
])
def test_manifest_paths_no_file_system_takes_are_rejected(tmp_path: Path, cell: str, reason: str) -> None:
    csv_path = _manifest_survey(tmp_path, [])
    with open(csv_path, "a", newline="") as f:
        csv.writer(f).writerow([cell, "lower", "0"])
    out = tmp_path / "out"
    result = run("convert", "--manifest", csv_path, out, "--formats", "wds", "--workers", 1,
                 "--max-resolution", 32)
    assert result.exit_code == 0, result.output
    [(path, why)] = rejected_rows(out)
    assert why.startswith(reason), why
    assert "converted 6 + rejected 1 = found 7" in result.output


def test_a_path_too_long_in_labels_csv_is_rejected(tmp_path: Path) -> None:
    src = _grade_folder_survey(tmp_path)
    (src / "9t" / "labels.csv").write_text("file,grade\n" + "y" * 5000 + ".jpg,3\n")
    out = tmp_path / "out"
    result = run("convert", src, out, "--formats", "wds", "--workers", 1, "--max-resolution", 32)
    assert result.exit_code == 0, result.output
    reasons = [why for _, why in rejected_rows(out)]
    assert any(why.startswith("path too long for the file system") for why in reasons), reasons


def test_rejected_csv_of_an_escaped_name_stays_utf8(tmp_path: Path) -> None:
    """The escaped form reads back with a UTF-8 reader (inspect), so nothing downstream breaks."""
    src = _grade_folder_survey(tmp_path)
    (src / "9m" / "3").joinpath(os.fsdecode(b"\xff\xfe.jpg")).write_bytes(jpeg_bytes(4))
    out = tmp_path / "out"
    assert run("convert", src, out, "--formats", "wds", "--workers", 1, "--max-resolution", 32).exit_code == 0
    assert rejected_rows(out) == [("9m/3/\\xff\\xfe.jpg", "file name is not valid UTF-8 (rename the file)")]
    assert inspect_shards(out)["rejected"] == 1
