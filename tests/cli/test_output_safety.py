"""Issue 26, the output side: an output never overwrites an input or a file cornpipe did not write, one
writer per run folder, and a full disk or a crafted checkpoint is one `Error:` line with nothing lost.

Each test types the command a user would, reads the one line they see and checks that nothing of
theirs was lost. We run as root (a chmod'ed folder stays writable), so a full disk and a read-only
folder are simulated in-process: the write raises what the kernel would (ENOSPC, EROFS).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import cli_run, error_line

from cornpipe.runs.checkpoint import load_checkpoint
from cornpipe.runs.lock import LOCK_NAME, FolderLock

run = cli_run
TINY = ["--model", "resnet_plus_tiny", "--image-size", 32, "--batch-size", 8, "--loader", "torch",
        "--workers", 0, "--device", "cpu", "--bootstrap", 0, "--max-batches", 2]


@pytest.fixture(scope="module")
def tiny_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch run made by `cornpipe train`; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("safety") / "run"
    result = run("train", tiny_shards, "--out", out, "--epochs", 2, *TINY)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def a_run(tiny_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the output was checked")

    monkeypatch.setattr("cornpipe.runs.build.create_model", refuse)


# --------------------------------------------------------------------------- data lost 1-2: predict --out

def test_predict_out_onto_its_checkpoint_is_refused(a_run: Path, synth_raw: Path) -> None:
    best = a_run / "best.pt"
    before = best.read_bytes()
    image = next((synth_raw / "9l").glob("*.jpg"))
    result = run("predict", best, image, "--out", best)
    assert result.exit_code == 1
    assert error_line(result) == (f"Error: {best} is an input of this command: cornpipe never writes over its "
                                  "inputs; give another output path")
    assert best.read_bytes() == before


def test_predict_out_onto_an_input_image_is_refused(a_run: Path, synth_raw: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.jpg"
    shutil.copy(next((synth_raw / "9l").glob("*.jpg")), victim)
    before = victim.read_bytes()
    link = tmp_path / "same.jpg"
    os.link(victim, link)  # the same file under another name
    for out in (victim, link):
        result = run("predict", a_run / "best.pt", victim, "--out", out)
        assert result.exit_code == 1
        assert "is an input of this command" in error_line(result)
    assert victim.read_bytes() == before


def test_predict_never_replaces_a_file_it_did_not_write(a_run: Path, synth_raw: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("field notes, 2024 season")
    result = run("predict", a_run / "best.pt", synth_raw / "9l", "--out", notes)
    assert result.exit_code == 1
    assert error_line(result).startswith(f"Error: {notes} exists and is not a predictions CSV cornpipe wrote")
    assert notes.read_text() == "field notes, 2024 season"
    ok = tmp_path / "preds.csv"  # its own CSV it replaces
    for _ in range(2):
        assert run("predict", a_run / "best.pt", synth_raw / "9l", "--out", ok).exit_code == 0


def test_predict_onto_a_full_disk_keeps_the_previous_csv(a_run: Path, synth_raw: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "preds.csv"
    assert run("predict", a_run / "best.pt", synth_raw / "9l", "--out", out).exit_code == 0
    before = out.read_bytes()
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("cornpipe.shards.atomic.os.fsync", full)
    result = run("predict", a_run / "best.pt", synth_raw / "9m", "--out", out)
    monkeypatch.setattr("cornpipe.shards.atomic.os.fsync", real_fsync)
    assert result.exit_code == 1
    line = error_line(result)
    assert line.startswith(f"Error: no space left on {tmp_path} writing preds.csv (")
    assert line.endswith("MB free); the previous preds.csv is intact")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv", "run"]  # no temp file


# --------------------------------------------------------------------------- data lost 3-4: train --force

@pytest.mark.parametrize("user_files", [{"config.json": '{"my": "settings"}', "notes.txt": "mine"},
                                        {"metrics.jsonl": '{"epoch": 1}\n'}])
def test_train_force_refuses_a_folder_cornpipe_did_not_make(user_files: dict[str, str], tiny_shards: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_training(monkeypatch)
    out = tmp_path / "myproject"
    out.mkdir()
    for name, text in user_files.items():
        (out / name).write_text(text)
    result = run("train", tiny_shards, "--out", out, "--force", *TINY)
    assert result.exit_code == 1
    assert error_line(result) == (f"Error: {out} is not a run directory cornpipe made (no .cornpipe-run) and is "
                                  "not empty; --force overwrites only a run directory's files")
    assert {p.name: p.read_text() for p in out.iterdir()} == user_files


def test_train_force_replaces_a_run_cornpipe_made(a_run: Path, tiny_shards: Path) -> None:
    (a_run / "notes.txt").write_text("my notes on this run")
    marker = (a_run / ".cornpipe-run").read_text()
    result = run("train", tiny_shards, "--out", a_run, "--force", "--epochs", 1, *TINY)
    assert result.exit_code == 0, result.output
    assert [json.loads(x)["epoch"] for x in (a_run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (a_run / "notes.txt").read_text() == "my notes on this run"
    assert (a_run / ".cornpipe-run").read_text() == marker
    assert not (a_run / LOCK_NAME).exists()  # released


def test_a_run_made_before_the_marker_is_still_a_run(a_run: Path) -> None:
    from cornpipe.runs.run_dir import is_run_dir

    (a_run / ".cornpipe-run").unlink()
    assert is_run_dir(a_run)  # its config.json is the one cornpipe writes, beside its checkpoints
    (a_run / "config.json").write_text('{"model": "mine"}')
    assert not is_run_dir(a_run)


def test_train_out_onto_its_shard_set_is_refused(tiny_shards: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    no_training(monkeypatch)
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    before = sorted(p.name for p in shards.iterdir())
    result = run("train", shards, "--out", shards, "--force", *TINY)
    assert result.exit_code == 1
    assert "is an input of this command" in error_line(result)
    assert sorted(p.name for p in shards.iterdir()) == before


def test_train_force_never_deletes_its_own_init_weights(a_run: Path, tiny_shards: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    no_training(monkeypatch)
    before = (a_run / "best.pt").read_bytes()
    result = run("train", tiny_shards, "--out", a_run, "--force", "--init-weights", a_run / "best.pt", *TINY)
    assert result.exit_code == 1
    assert error_line(result).startswith(f"Error: {a_run / 'best.pt'} is an input of this command")
    assert (a_run / "best.pt").read_bytes() == before


# --------------------------------------------------------------------------- one writer per run folder

def test_a_second_writer_of_a_run_is_refused_naming_the_holder(a_run: Path) -> None:
    metrics = (a_run / "metrics.jsonl").read_text()
    with FolderLock(a_run, "run", print):  # the first `train --resume` (here: this process) holds it
        result = run("train", "--resume", a_run, "--epochs", 3)
    assert result.exit_code == 1
    line = error_line(result)
    assert line.startswith(f"Error: {a_run} is in use by another cornpipe run (pid {os.getpid()} on host "
                           f"{socket.gethostname()}, started ")
    assert line.endswith("); wait for it to end or stop it")
    assert (a_run / "metrics.jsonl").read_text() == metrics


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_stale_lock_of_a_dead_run_is_reclaimed_with_a_line(a_run: Path) -> None:
    holder = {"pid": _dead_pid(), "host": socket.gethostname(), "started": "2026-01-01 00:00:00 UTC"}
    (a_run / LOCK_NAME).write_text(json.dumps(holder))  # a run killed -9 leaves its lock file
    result = run("train", "--resume", a_run, "--epochs", 3)
    assert result.exit_code == 0, result.output
    assert (f"reclaimed a stale lock on {a_run}: its run (pid {holder['pid']} on host {holder['host']}, "
            "started 2026-01-01 00:00:00 UTC) ended without releasing it") in " ".join(result.output.split())
    assert [json.loads(x)["epoch"] for x in (a_run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_lock_held_only_by_orphaned_workers_is_reclaimed(tmp_path: Path) -> None:
    from cornpipe.shards.atomic import take_lock

    folder = tmp_path / "run"
    folder.mkdir()
    fd = take_lock(folder / LOCK_NAME)  # still held (as by a dead run's loader worker) ...
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "x"}).encode(), 0)
    lines: list[str] = []
    try:
        with FolderLock(folder, "run", lines.append):  # ... but its run is gone
            assert lines and lines[0].startswith(f"reclaimed the lock on {folder}: its run (pid ")
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- resume: config, epochs, damage

def test_resume_with_fewer_epochs_than_done_is_refused(a_run: Path) -> None:
    result = run("train", "--resume", a_run, "--epochs", 1)
    assert result.exit_code == 1
    assert error_line(result) == (f"Error: --epochs 1 is fewer than the 2 epochs {a_run} has done; "
                                  "give --epochs 2 or more to continue it")


def test_resume_after_a_half_written_metrics_line(a_run: Path) -> None:
    with (a_run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "lr": 0.00')  # killed while writing epoch 3's line
    result = run("train", "--resume", a_run, "--epochs", 3)
    assert result.exit_code == 0, result.output
    assert [json.loads(x)["epoch"] for x in (a_run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_after_a_kill_during_the_first_checkpoint_write(a_run: Path) -> None:
    """Killed while epoch 1's last.pt was written: best.pt (epoch 1) is complete, a .last.pt.tmp is left."""
    state = load_checkpoint(a_run / "best.pt")
    torch.save({**state, "epoch": 1}, a_run / "best.pt")
    (a_run / "last.pt").unlink()
    (a_run / ".last.pt.tmp").write_bytes(b"PK\x03\x04 cut short")
    lines = (a_run / "metrics.jsonl").read_text().splitlines()
    (a_run / "metrics.jsonl").write_text(lines[0] + "\n")
    result = run("train", "--resume", a_run, "--epochs", 2)
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert f"removed {a_run / '.last.pt.tmp'}: a checkpoint write that did not finish" in out
    assert f"checkpoint not found: {a_run / 'last.pt'}; resuming from {a_run / 'best.pt'} (epoch 1)" in out
    assert not (a_run / ".last.pt.tmp").exists()
    assert load_checkpoint(a_run / "last.pt")["epoch"] == 2


@pytest.mark.parametrize(("change", "expected"), [
    (lambda s: s.update(epoch="2"), "its 'epoch' is a str, not a int"),
    (lambda s: s.pop("optimizer"), "its 'optimizer' is missing"),
    (lambda s: s.pop("data"), "its 'data' is missing"),
])
def test_crafted_checkpoints_are_one_line_on_resume(change, expected: str, a_run: Path) -> None:
    state = load_checkpoint(a_run / "last.pt")
    change(state)
    torch.save(state, a_run / "last.pt")
    result = run("train", "--resume", a_run, "--epochs", 3)
    assert result.exit_code == 1
    assert error_line(result) == f"Error: {a_run / 'last.pt'} cannot be used to resume: {expected}"


def test_predict_with_weights_that_do_not_fit_the_config_is_one_line(a_run: Path, synth_raw: Path,
                                                                     tmp_path: Path) -> None:
    state = load_checkpoint(a_run / "best.pt")
    state["config"]["model"] = "resnet_plus18"
    torch.save(state, tmp_path / "odd.pt")
    result = run("predict", tmp_path / "odd.pt", synth_raw / "9l", "--out", tmp_path / "p.csv")
    assert result.exit_code == 1
    assert error_line(result).startswith(f"Error: the weights in {tmp_path / 'odd.pt'} do not fit its model "
                                         "resnet_plus18 (")
    assert not (tmp_path / "p.csv").exists()
    no_data = {k: v for k, v in state.items() if k != "data"}
    torch.save(no_data, tmp_path / "nodata.pt")
    result = run("predict", tmp_path / "nodata.pt", synth_raw / "9l", "--out", tmp_path / "p.csv")
    assert error_line(result) == f"Error: {tmp_path / 'nodata.pt'} cannot be used to predict: its 'data' is missing"


# --------------------------------------------------------------------------- a full disk while training

def test_a_full_disk_at_a_checkpoint_write_keeps_the_previous_one(a_run: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save
    last_before = (a_run / "last.pt").read_bytes()

    real_usage = shutil.disk_usage

    def save_then_fill(state: dict, f) -> None:  # what torch says when the disk fills mid-checkpoint
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2545664 vs 2545556")

    monkeypatch.setattr("cornpipe.runs.checkpoint.torch.save", save_then_fill)
    monkeypatch.setattr("cornpipe.runs.checkpoint.shutil.disk_usage",
                        lambda p: real_usage(p)._replace(free=4096))  # the disk is full
    result = run("train", "--resume", a_run, "--epochs", 3)
    monkeypatch.setattr("cornpipe.runs.checkpoint.torch.save", real_save)
    monkeypatch.setattr("cornpipe.runs.checkpoint.shutil.disk_usage", real_usage)
    assert result.exit_code == 1
    line = error_line(result)
    saved = line.split(f"{a_run}/")[1].split(":")[0]  # best.pt when epoch 3 improved, else last.pt
    assert saved in ("best.pt", "last.pt")
    assert line == (f"Error: cannot write checkpoint {a_run / saved}: no space left on {a_run} (0.0 MB free with "
                    f"the partial file removed); the previous {saved} is intact")
    assert (a_run / "last.pt").read_bytes() == last_before
    assert not list(a_run.glob(".*.tmp")) and not (a_run / LOCK_NAME).exists()
    assert run("train", "--resume", a_run, "--epochs", 3).exit_code == 0  # with room again, it goes on


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_checkpoint_write_leaves_no_temp_file(interrupt: type[BaseException], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from cornpipe.runs.checkpoint import save_checkpoint

    save_checkpoint({"format": 1, "epoch": 1}, tmp_path / "last.pt")

    def stopped(state: dict, f) -> None:  # Ctrl-C, or SIGTERM turned into SystemExit, mid-write
        f.write(b"PK\x03\x04")
        raise interrupt()

    monkeypatch.setattr("cornpipe.runs.checkpoint.torch.save", stopped)
    with pytest.raises(interrupt):
        save_checkpoint({"format": 1, "epoch": 2}, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1


def test_report_on_a_read_only_run_folder_is_one_line(a_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = (a_run / "report.md").read_text()

    def read_only(*args: object, **kwargs: object) -> str:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("cornpipe.shards.atomic.tempfile.mkdtemp", read_only)
    result = run("report", a_run)
    assert result.exit_code == 1
    assert error_line(result) == (f"Error: cannot create {a_run / 'report.md'}: {a_run} does not accept new "
                                  "files or folders (Read-only file system): the report was not written")
    assert (a_run / "report.md").read_text() == before


# --------------------------------------------------------------------------- bench --json

def test_bench_json_never_lands_on_an_input_or_a_foreign_file(tiny_shards: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    manifest = (shards / "manifest.json").read_bytes()
    result = run("bench", "loaders", shards, "--backends", "torch", "--json", shards / "manifest.json")
    assert result.exit_code == 1
    assert error_line(result) == (f"Error: {shards / 'manifest.json'} is inside the input {shards}: cornpipe "
                                  "never writes into its inputs; give another output path")
    assert (shards / "manifest.json").read_bytes() == manifest
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    result = run("bench", "train", "--json", notes, "--device", "cpu", "--steps", 1)
    assert result.exit_code == 1
    assert error_line(result).startswith(f"Error: {notes} exists and is not a JSON summary cornpipe wrote")
    assert notes.read_text() == "mine"
