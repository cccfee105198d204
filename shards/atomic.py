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
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

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


def check_not_an_input(outputs: Iterable[Path | str], inputs: Iterable[Path | str | None],
                       inside_too: bool = False) -> None:
    """Raise OutputError when an output path that exists is one of the inputs: the same file by
    device and inode, so a link or another spelling of the path is caught too. With `inside_too`, an
    output anywhere inside an input folder (a shard set) is refused as well."""
    taken = {}
    for item in inputs:
        if item is None:
            continue
        try:
            st = os.stat(item)
        except (OSError, ValueError):
            continue
        taken.setdefault((st.st_dev, st.st_ino), item)
    outputs = list(outputs)
    if inside_too:
        for out in outputs:
            for folder in (Path(item) for item in taken.values() if Path(item).is_dir()):
                if Path(os.path.realpath(out)).is_relative_to(os.path.realpath(folder)):
                    raise OutputError(f"{out} is inside the input {folder}: cornpipe never writes into its "
                                      "inputs; give another output path")
    for out in outputs:
        try:
            st = os.stat(out)
        except (OSError, ValueError):
            continue
        hit = taken.get((st.st_dev, st.st_ino))
        if hit is not None:
            same = "" if os.path.abspath(out) == os.path.abspath(hit) else f" (the same file as {hit})"
            raise OutputError(f"{out} is an input of this command{same}: cornpipe never writes over its inputs; "
                              "give another output path")


def check_own_file(out: Path, prefix: bytes, what: str) -> None:
    """Raise OutputError when `out` exists, is not empty and does not start with `prefix`: a file that
    cornpipe did not write (as `what`) is never replaced."""
    try:
        with open(out, "rb") as f:
            head = f.read(len(prefix))
    except (FileNotFoundError, IsADirectoryError):
        return
    except OSError as exc:
        raise OutputError(f"cannot read {out} to check what it is: {exc.strerror or exc}") from exc
    if head and head != prefix:
        raise OutputError(f"{out} exists and is not {what} cornpipe wrote: it is left as it is; "
                          "give another path or delete it yourself")


@contextmanager
def write_atomically(out: Path, newline: str | None = None) -> Iterator[TextIO]:
    """A text file that becomes `out` only when complete: written beside it under a temp name, then
    renamed over it. A failure (a full disk) or an interrupt removes the temp file and leaves a previous
    `out` as it was; OSError is worded as one OutputError line."""
    out = Path(out)
    tmp = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}"
    try:
        with tmp.open("w", newline=newline, encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            kept = f"the previous {out.name} is intact" if out.exists() else f"no {out.name} was written"
            if exc.errno in DISK_FULL:
                raise OutputError(f"no space left on {out.parent} writing {out.name} "
                                  f"({free_bytes(out.parent) / 1e6:.1f} MB free); {kept}") from exc
            raise OutputError(f"cannot write {out}: {exc.strerror or exc}; {kept}") from exc
        raise


def temp_folder(out: Path) -> Path:
    return out.parent / f".{out.name}{TMP_MARK}{os.getpid()}"


def lock_folder(tmp: Path) -> int:
    return take_lock(tmp / LOCK_FILE)


def take_lock(path: Path) -> int:
    """flock `path` (created if missing) and write who holds it; BlockingIOError when another process does.

    The lock is the open file's, so it ends with the holder's process (kill -9 included). A lock file
    unlinked and made anew by a reclaiming run between our open and our flock is not ours: retried.
    """
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass  # unlinked by its releasing holder after our open: try the new file
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
    return fd


def read_holder(path: Path) -> dict | None:
    """Who took the lock file `path` last ({"pid", "host", "started"}); None when absent or unreadable."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def pid_alive(pid: int) -> bool:
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
        if pid.isdigit() and not pid_alive(int(pid)):
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
                if not (pid.isdigit() and not pid_alive(int(pid))):
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
