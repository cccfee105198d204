"""Write a folder atomically: build it in `.<OUT name>.tmp-<pid>` beside OUT, fsync, rename.

The temporary folder holds an flock (`.lock`) while its run is alive, so a later run can tell a killed
run's leftovers (removed) from a live run's folder (refused) without trusting pids, which get reused.
Only when the lock is held and the run named by the folder's pid is gone is the pid consulted: then
the holders are workers that outlived their run (older cornpipe versions), and the folder is reclaimed.
Free space is checked here too, and a full disk is worded once (`no_space`).
`check_can_create` is the one check, shared by every command that writes, that an output path can be
made at all, done before any slow work.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from cornpipe.errors import ConvertError, OutputError

TMP_MARK = ".tmp-"
LOCK_FILE = ".lock"


def check_can_create(path: Path | str) -> None:
    """Raise OutputError (one line) unless the output `path` (a file or folder) can be written.

    Every existing folder above `path` must be a folder, and the nearest one (and `path` itself when it
    is an existing folder) must take a new entry: a hidden probe folder is made and removed there. So a
    parent that is a file, a read-only folder or file system, and /proc or /sys fail at once, before
    any slow work. Whether an existing `path` may be replaced is the caller's question.
    """
    path = Path(path).absolute()
    nearest = None
    for parent in path.parents:
        if parent.is_dir():
            nearest = parent
            break
        if parent.exists() or parent.is_symlink():
            what = "a file, not a folder" if parent.is_file() else "not a folder"
            raise OutputError(f"cannot create {path}: {parent} is {what}")
    folders = [nearest] if nearest is not None else []
    if path.is_dir():
        folders.append(path)
    for folder in folders:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=folder))
        except OSError as exc:
            raise OutputError(f"cannot create {path}: {folder} does not accept new files or folders "
                              f"({exc.strerror or exc})") from exc
    if path.is_file() and not os.access(path, os.W_OK):
        raise OutputError(f"cannot write {path}: the file is read-only")


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
                pid = tmp.name.rsplit(TMP_MARK, 1)[-1]
                if not (pid.isdigit() and not _pid_alive(int(pid))):
                    raise ConvertError(f"another convert is writing {out} "
                                       f"(its temporary folder {tmp.name} is in use)") from exc
                # held, but its run is dead: orphaned workers hold it, and they write nothing here
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


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, quota, file-size limit


class DiskFull(OSError):
    """The outputs will not fit (found mid-run): convert removes its folder, then words it (`no_space`)."""

    def __init__(self, needed: int) -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.needed = needed


def free_bytes(folder: Path) -> int:
    """Bytes a non-root writer may still use on the file system of `folder`."""
    return shutil.disk_usage(folder).free


def no_space(folder: Path, needed: int) -> OutputError:
    """The one wording of a full disk, with the estimate and what is free now."""
    return OutputError(f"no space left on {folder} (needed ~{needed / 1e6:.1f} MB, "
                       f"free {free_bytes(folder) / 1e6:.1f} MB)")


def check_space(folder: Path, needed: int) -> None:
    """Raise `no_space` before any slow work when `folder`'s file system has less than `needed` bytes."""
    if free_bytes(folder) < needed:
        raise no_space(folder, needed)
