"""One writer per run folder and per cv folder: an flock on FOLDER/.cornpipe-lock (shards.atomic's lock).

A second writer gets one line naming the holder (pid, host, start time). The lock dies with its
process, so a lock file left by a killed run is simply taken over, with a line saying so; when the
lock is still held but its run's pid is gone on this host, loader workers that outlived the run hold
it (they write nothing): the file is replaced and the folder reclaimed, as convert does.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from cornpipe.errors import OutputError
from cornpipe.shards.atomic import pid_alive, read_holder, take_lock

LOCK_NAME = ".cornpipe-lock"


def describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


class FolderLock:
    """Held from `with` to its end (or `release`); `what` names the writer in messages ("run", "cv")."""

    def __init__(self, folder: Path, what: str, log: Callable[[str], None]) -> None:
        self.folder, self.what, self.log = Path(folder), what, log
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> FolderLock:
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            holder = read_holder(self.path)
            try:
                self.fd = take_lock(self.path)
            except BlockingIOError as exc:
                here = holder is not None and holder.get("host") == socket.gethostname()
                if here and not pid_alive(int(holder["pid"])):  # orphaned workers hold it
                    self.path.unlink(missing_ok=True)
                    self.log(f"reclaimed the lock on {self.folder}: its {self.what} ({describe(holder)}) is gone")
                    continue
                who = describe(holder) if holder else "a process that has not written its name yet"
                self._drop_created()
                raise OutputError(f"{self.folder} is in use by another cornpipe {self.what} ({who}); "
                                  "wait for it to end or stop it") from exc
            if holder is not None and holder.get("pid") != os.getpid():
                self.log(f"reclaimed a stale lock on {self.folder}: its {self.what} ({describe(holder)}) "
                         "ended without releasing it")
            return self
        raise OutputError(f"cannot lock {self.folder}: its lock file keeps changing")

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # before close: a waiter that opened this file sees it is stale
        os.close(self.fd)
        self.fd = None
        self._drop_created()

    def _drop_created(self) -> None:
        """A folder made only to hold the lock goes again when nothing else was written into it."""
        if self.created and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()

    def __enter__(self) -> FolderLock:
        return self if self.fd is not None else self.acquire()  # open_cv_dir hands over a held lock

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
