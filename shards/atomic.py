"""Write a folder atomically: build it in `.<OUT name>.tmp-<pid>` beside OUT, fsync, rename.

The temporary folder holds an flock (`.lock`) while its run is alive, so a later run can tell a killed
run's leftovers (removed) from a live run's folder (refused) without trusting pids, which get reused.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from cornpipe.errors import ConvertError

TMP_MARK = ".tmp-"
LOCK_FILE = ".lock"



def temp_folder(out: Path) -> Path:
    return out.parent / f".{out.name}{TMP_MARK}{os.getpid()}"


def lock_folder(tmp: Path) -> int:
    fd = os.open(tmp / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temp(out: Path) -> list[Path]:
    """Remove temp folders of killed runs into `out`; refuse when a live run is writing it."""
    removed = []
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):  # a run killed while replacing OUT
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
            removed.append(old)
    for tmp in sorted(out.parent.glob(f".{out.name}{TMP_MARK}*")):
        if not tmp.is_dir():
            continue
        lock = tmp / LOCK_FILE
        if lock.exists():
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise ConvertError(f"another convert is writing {out} (its temporary folder {tmp.name} is in use)") from exc
            finally:
                os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished temp folder to OUT (replacing an old OUT only with force)."""
    old = None
    if out.exists() or out.is_symlink():
        if not force:  # appeared while we worked
            raise ConvertError(f"{out} exists; use --force to replace it")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
