"""Bad inputs from the issue tracker (issue 13): each ends in one `Error:` line or a rejection with its
real reason, never a traceback, a wrong hint or a deleted user file.

We run as root, where a chmod'ed read-only folder is still writable, so unwritable outputs are tested
with a parent that is a file and with paths under /proc and /sys.
"""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import cli_run, copy_with_a_damaged_tar, error_line, jpeg_bytes

from cornpipe.errors import CheckpointError, ConfigError
from cornpipe.runs.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from cornpipe.runs.run_dir import prepare_run_dir
from cornpipe.shards.discover import discover
from cornpipe.shards.fields import SOURCES

run = cli_run  # the shared helpers of conftest, under this file's short name


# --------------------------------------------------------------------------- 4. impossible output paths

def _bad_out(kind: str, tmp_path: Path, name: str) -> tuple[Path, str]:
    """An output path that cannot be created, and the start of its error line."""
    if kind == "parent is a file":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a folder")
        out = blocker / "sub" / name
        return out, f"Error: cannot create {out}: {blocker} is a file, not a folder"
    top = "/proc" if kind == "proc" else "/sys"
    out = Path(top) / f"cornpipe-test-{name}"
    return out, f"Error: cannot create {out}: {top} does not accept new files or folders ("


BAD_OUT_KINDS = ["parent is a file", "proc", "sys"]


@pytest.mark.parametrize("kind", BAD_OUT_KINDS)
def test_convert_to_an_impossible_out_fails_before_discovery(kind: str, synth_raw: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def no_discovery(*args: object, **kwargs: object) -> None:
        raise AssertionError("discovery started before OUT was checked")

    monkeypatch.setattr("cornpipe.shards.convert.discover", no_discovery)
    out, expected = _bad_out(kind, tmp_path, "shards")
    result = run("convert", synth_raw, out, "--formats", "wds", "--workers", 1)
    assert result.exit_code == 1
    assert error_line(result).startswith(expected)


@pytest.mark.parametrize("kind", BAD_OUT_KINDS)
def test_synth_to_an_impossible_out(kind: str, tmp_path: Path) -> None:
    out, expected = _bad_out(kind, tmp_path, "raw")
    result = run("synth", out, "--per-source", 1, "--image-size", 32)
    assert result.exit_code == 1
    assert error_line(result).startswith(expected)


@pytest.mark.parametrize("kind", BAD_OUT_KINDS)
def test_train_to_an_impossible_out(kind: str, tiny_shards: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before --out was checked")

    monkeypatch.setattr("cornpipe.runs.build.create_model", no_model)
    out, expected = _bad_out(kind, tmp_path, "run")
    result = run("train", tiny_shards, "--out", out, "--device", "cpu", "--model", "resnet_plus_tiny")
    assert result.exit_code == 1
    assert error_line(result).startswith(expected)


@pytest.mark.parametrize("kind", BAD_OUT_KINDS)
def test_predict_to_an_impossible_out_fails_before_loading(kind: str, tmp_path: Path) -> None:
    image = tmp_path / "leaf.jpg"
    image.write_bytes(jpeg_bytes(0))
    out, expected = _bad_out(kind, tmp_path, "pred.csv")
    # the checkpoint does not exist: the output is checked first, so that is not what is reported
    result = run("predict", tmp_path / "missing.pt", image, "--out", out)
    assert result.exit_code == 1
    assert error_line(result).startswith(expected)


# --------------------------------------------------------------------------- 5. --force keeps foreign folders

def test_convert_force_refuses_a_folder_that_is_not_a_shard_set(synth_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.txt").write_text("four years of work")
    result = run("convert", synth_raw, out, "--formats", "wds", "--workers", 1, "--force")
    assert result.exit_code == 1
    assert error_line(result) == (f"Error: {out} is not a shard set (it has no manifest.json) and is not empty; "
                                  "--force replaces only a cornpipe convert output or an empty folder")
    assert (out / "thesis.txt").read_text() == "four years of work"

    thesis = tmp_path / "thesis.txt"
    thesis.write_text("four years of work")
    result = run("convert", synth_raw, thesis, "--formats", "wds", "--workers", 1, "--force")
    assert result.exit_code == 1
    assert error_line(result) == (f"Error: {thesis} is a file, not a shard set; "
                                  "--force replaces only a cornpipe convert output or an empty folder")
    assert thesis.read_text() == "four years of work"


def test_synth_force_refuses_a_folder_synth_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    out.mkdir()
    (out / "thesis.txt").write_text("four years of work")
    result = run("synth", out, "--per-source", 1, "--image-size", 32, "--force")
    assert result.exit_code == 1
    assert error_line(result) == (f"Error: {out} holds thesis.txt, which cornpipe synth does not write; "
                                  "--force replaces only a synth output or an empty folder")
    assert (out / "thesis.txt").read_text() == "four years of work"

    # a real survey in the same layout (source folders with labels.csv) is not a synth output either
    survey = tmp_path / "survey"
    (survey / "9l").mkdir(parents=True)
    (survey / "9l" / "labels.csv").write_text("file,grade\nfield_photo_001.jpg,3\n")
    (survey / "9l" / "field_photo_001.jpg").write_bytes(jpeg_bytes(1))
    result = run("synth", survey, "--per-source", 1, "--image-size", 32, "--force")
    assert result.exit_code == 1
    assert error_line(result) == (f"Error: {survey} holds 9l/field_photo_001.jpg, which cornpipe synth does not "
                                  "write; --force replaces only a synth output or an empty folder")
    assert (survey / "9l" / "field_photo_001.jpg").exists()

    # a synth output is replaced, and a user's file added to it later keeps it from being replaced
    again = tmp_path / "again"
    assert run("synth", again, "--per-source", 1, "--image-size", 32).exit_code == 0
    result = run("synth", again, "--per-source", 2, "--image-size", 32, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in again.iterdir()) == sorted(SOURCES)
    assert len(list((again / "9l").glob("*.jpg"))) == 2
    (again / "9l" / "notes.txt").write_text("mine")
    result = run("synth", again, "--per-source", 1, "--image-size", 32, "--force")
    assert result.exit_code == 1
    assert "9l/notes.txt" in error_line(result)
    assert (again / "9l" / "notes.txt").exists()


def test_train_force_refuses_a_folder_that_is_not_a_run(tiny_shards: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started in a folder that is not a run directory")

    monkeypatch.setattr("cornpipe.runs.build.create_model", no_model)
    out = tmp_path / "docs"
    out.mkdir()
    (out / "thesis.txt").write_text("four years of work")
    result = run("train", tiny_shards, "--out", out, "--force", "--device", "cpu")
    assert result.exit_code == 1
    assert error_line(result) == (f"Error: {out} is not a run directory cornpipe made (no .cornpipe-run) and is "
                                  "not empty; --force overwrites only a run directory's files")
    assert (out / "thesis.txt").read_text() == "four years of work"


def test_prepare_run_dir_force_clears_only_run_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, force=False)  # a run folder cornpipe made: it holds its marker
    (run_dir / "metrics.jsonl").write_text("{}\n")
    (run_dir / "thesis.txt").write_text("four years of work")
    with pytest.raises(ConfigError, match="already exists; use --force"):
        prepare_run_dir(run_dir, force=False)
    prepare_run_dir(run_dir, force=True)
    assert sorted(p.name for p in run_dir.iterdir()) == [".cornpipe-run", "thesis.txt"]


# --------------------------------------------------------------------------- 6. odd files in discovery

def _odd_entries(folder: Path) -> None:
    """A FIFO, a symlink loop, a folder named like an image, /dev/zero and a dangling link in `folder`."""
    os.mkfifo(folder / "fifo.jpg")
    os.symlink("loop.jpg", folder / "loop.jpg")
    (folder / "dir.jpg").mkdir()
    os.symlink("/dev/zero", folder / "zero.jpg")
    os.symlink("gone.jpg", folder / "dangling.jpg")


ODD_REASONS = {
    "fifo.jpg": "not a regular file (named pipe)",
    "loop.jpg": "symlink loop",
    "dir.jpg": "not a regular file (folder)",
    "zero.jpg": "not a regular file (character device)",
    "dangling.jpg": "broken symlink (points to gone.jpg, which does not exist)",
}


def test_odd_files_listed_in_labels_csv_get_their_real_reason(tmp_path: Path) -> None:
    src = tmp_path / "src"
    folder = src / "9l"
    folder.mkdir(parents=True)
    (folder / "ok.jpg").write_bytes(jpeg_bytes(0))
    _odd_entries(folder)
    rows = ["ok.jpg", *ODD_REASONS, "ghost.jpg"]
    (folder / "labels.csv").write_text("file,grade\n" + "".join(f"{name},3\n" for name in rows))
    found = discover(src)
    assert [c.rel for c in found.samples] == ["9l/ok.jpg"]
    assert {r.path: r.reason for r in found.rejected} == {
        **{f"9l/{name}": reason for name, reason in ODD_REASONS.items()},
        "9l/ghost.jpg": "listed in 9l/labels.csv (line 8) but the file does not exist",
    }


def test_odd_files_in_grade_folders_are_found_and_rejected(tmp_path: Path) -> None:
    src = tmp_path / "src"
    folder = src / "9m" / "5"
    folder.mkdir(parents=True)
    (folder / "ok.jpg").write_bytes(jpeg_bytes(0))
    _odd_entries(folder)
    (folder / "dir.jpg").rmdir()  # a folder inside a grade folder is walked into, not an input
    found = discover(src)
    assert [c.rel for c in found.samples] == ["9m/5/ok.jpg"]
    assert {r.path: r.reason for r in found.rejected} == {
        f"9m/5/{name}": reason for name, reason in ODD_REASONS.items() if name != "dir.jpg"}


def test_odd_files_in_a_manifest_are_accounted_for_by_convert(tmp_path: Path) -> None:
    data = tmp_path / "data"
    img = data / "img"
    img.mkdir(parents=True)
    for i in range(4):
        (img / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    _odd_entries(img)
    names = [f"{i}.jpg" for i in range(4)] + list(ODD_REASONS)
    (data / "manifest.csv").write_text("path,position,grade\n" + "".join(f"img/{n},lower,3\n" for n in names))
    out = tmp_path / "out"
    result = run("convert", "--manifest", data / "manifest.csv", out, "--formats", "wds", "--workers", 1,
                 "--val-fraction", 0.25, "--max-resolution", 32)
    assert result.exit_code == 0, result.output
    with open(out / "rejected.csv", newline="", encoding="utf-8") as f:
        rejected = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    assert rejected == {f"img/{name}": reason for name, reason in ODD_REASONS.items()}
    assert "converted 4 + rejected 5 = found 9" in result.output


def test_manifest_that_is_a_device_is_refused(tmp_path: Path) -> None:
    result = run("convert", "--manifest", "/dev/zero", tmp_path / "out", "--formats", "wds")
    assert result.exit_code == 1
    assert error_line(result) == "Error: manifest /dev/zero is not a regular file (character device)"


# --------------------------------------------------------------------------- 7. overflowing stage, non-UTF-8 TOML

def test_non_finite_stage_in_a_manifest_is_a_rejection(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    (tmp_path / "m.csv").write_text("path,position,grade,stage\n0.jpg,lower,3,inf\n1.jpg,lower,3,1e400\n"
                                    "2.jpg,lower,3,-inf\n3.jpg,lower,3,9\n")
    found = discover(None, tmp_path / "m.csv")
    assert [(c.rel, c.stage) for c in found.samples] == [("3.jpg", 9)]
    assert {r.path: r.reason for r in found.rejected} == {
        "0.jpg": "stage 'inf' is not a finite number",
        "1.jpg": "stage '1e400' is not a finite number",
        "2.jpg": "stage '-inf' is not a finite number",
    }


def test_non_utf8_train_config_is_one_line(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_bytes(b"epochs = 2\n# r\xe9sum\xe9 in latin-1\n")
    result = run("train", tmp_path, "--config", toml, "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert error_line(result) == f"Error: {toml} is not UTF-8 text (invalid continuation byte)"


# --------------------------------------------------------------------------- 12. verify names every damaged file

def test_verify_names_every_damaged_file(tiny_shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    tar = copy_with_a_damaged_tar(tiny_shards, copy)
    idx = copy / "val-000000.idx"
    idx.unlink()
    rejected = copy / "rejected.csv"
    size = rejected.stat().st_size
    with open(rejected, "ab") as f:
        f.write(b"x.jpg,tampered\r\n")
    result = run("verify", copy)
    assert result.exit_code == 1
    line = error_line(result)
    head, _, rest = line.partition(": ")
    assert head == "Error"
    count, _, problems = rest.partition(": ")
    assert count == "3 files are damaged"
    assert sorted(problems.split("; ")) == sorted([f"{tar} is damaged (sha256 mismatch)", f"{idx} is missing",
                                                   f"{rejected} is damaged ({size + 16} bytes, manifest says {size})"])


# --------------------------------------------------------------------------- 13. checkpoints: foreign and truncated

class _Payload:
    """A pickle that makes a folder when unpickled: the kind of file weights_only=True must stop."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


PICKLED_OBJECTS = "is not a cornpipe checkpoint: it holds pickled Python objects, which cornpipe never loads " \
                  "(they could run code)"


@pytest.mark.parametrize(("how", "message"), [
    ("torch.save", "{path} " + PICKLED_OBJECTS),
    ("pickle protocol 2", "{path} " + PICKLED_OBJECTS),
    # torch's safe loader stops protocol 4 at its first opcode, before any object is named
    ("pickle protocol 4", "cannot read checkpoint {path}: it is not a cornpipe checkpoint "
                          "(not a file written by torch.save)"),
])
def test_crafted_pickle_is_not_a_checkpoint(how: str, message: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = {"format": CHECKPOINT_FORMAT, "model": _Payload(marker)}
    if how == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=int(how[-1])))
    image = tmp_path / "leaf.jpg"
    image.write_bytes(jpeg_bytes(0))
    result = run("predict", path, image, "--out", tmp_path / "pred.csv")
    assert result.exit_code == 1
    assert error_line(result) == "Error: " + message.format(path=path)
    assert "weights_only" not in result.output
    assert not marker.exists()


def test_truncated_checkpoint_says_truncated(tmp_path: Path) -> None:
    whole = tmp_path / "whole.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": {f"w{i}": torch.randn(64, 64) for i in range(20)}}, whole)
    data = whole.read_bytes()
    assert load_checkpoint(whole)["format"] == CHECKPOINT_FORMAT
    cut = tmp_path / "cut.pt"
    # these cuts cover torch's three failures: EOFError, "failed finding central directory", [Errno 22]
    for size in (0, 40, len(data) // 10, len(data) // 2, len(data) * 9 // 10, len(data) - 1):
        cut.write_bytes(data[:size])
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(cut)
        assert str(info.value) == (f"checkpoint {cut} is truncated (only {size} bytes): "
                                   "a save or copy did not finish")
