"""Opening an input file for reading without ever blocking, and naming a path a user can read.

A named pipe opened for reading waits for a writer that never comes, and a device can be endless:
every file cornpipe reads (a shard, an index, manifest.json, an image, a CSV) is opened non-blocking
and checked to be a regular file before a byte is read (`open_regular`). A file name that is not
valid UTF-8 (a Latin-1 name from an old camera) cannot go into a UTF-8 CSV or JSON as it is:
`printable` escapes its stray bytes as `\\xNN`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from cornpipe.errors import CornpipeError

_KINDS = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "named pipe"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


class NotRegularFile(CornpipeError):
    """A path that names a folder, named pipe, socket or device where a file is read."""

    def __init__(self, path: Path | str, kind: str) -> None:
        self.path, self.kind = Path(path), kind
        self.reason = f"not a regular file ({kind})"
        super().__init__(f"{printable(path)} is {self.reason}")


def kind_of(mode: int) -> str | None:
    """What a stat mode names when it is not a regular file ('named pipe', 'folder', ...), else None."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "special file")


def check_not_special(path: Path | str) -> None:
    """NotRegularFile when `path` exists and is not a regular file (a missing file is the caller's
    to word); only its metadata is read, so a named pipe is never opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    kind = kind_of(mode)
    if kind is not None:
        raise NotRegularFile(path, kind)


def open_regular(path: Path | str) -> BinaryIO:
    """`open(path, "rb")` that raises NotRegularFile for anything but a regular file, without blocking
    (O_NONBLOCK: opening a pipe with no writer returns at once; it changes nothing for a regular file).
    OSError as `open` raises it (FileNotFoundError, PermissionError, ...)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        kind = kind_of(os.fstat(fd).st_mode)
        if kind is not None:
            raise NotRegularFile(path, kind)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_regular_bytes(path: Path | str) -> bytes:
    """The bytes of a regular file (NotRegularFile, or OSError as `Path.read_bytes` raises it)."""
    with open_regular(path) as f:
        return f.read()


def read_regular_text(path: Path | str, encoding: str = "utf-8") -> str:
    """The text of a regular file (NotRegularFile, OSError, UnicodeDecodeError)."""
    return read_regular_bytes(path).decode(encoding)


def printable(path: Path | str) -> str:
    """`path` as text that encodes to UTF-8: a file name's stray (non-UTF-8) bytes become `\\xNN`."""
    text = os.fspath(path)
    if is_printable(text):
        return text
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate no file system produced
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_printable(text: str) -> bool:
    """Whether `text` (a path) encodes to UTF-8 as it is (no bytes a file system let through)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
