"""convert's decode pass: `workers` processes decode, repair, resize and JPEG-encode each input; the
main process appends what the writers need to two staging files in the temporary folder.

What is staged, and why it stays small: every image's tar JPEG (the tar shards and a jpg-mode .beton
store these very bytes), and raw pixels only for the images the .beton stores raw (write mode raw, or
smart below its threshold). So staging is at most the size of the outputs it feeds: about half the
output in jpg mode, about the output in raw mode.

Memory: results travel in small chunks and at most `2 * workers` chunks are in flight, so the main
process holds at most `IN_FLIGHT_PER_WORKER * workers` prepared images (JPEG + staged pixels) at a time,
and each worker one decoded input plus its resized copy: peak memory is the interpreter and its
libraries (FFCV's import is the bulk) plus `workers` x one image, whatever the number of inputs.

Workers die with convert: each sets PR_SET_PDEATHSIG, so a kill -9 of convert ends them too, and each
closes its inherited copy of the output lock, so the lock is free the moment convert itself is gone.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np

from cornpipe.errors import ConvertError
from cornpipe.shards.files import NotRegularFile, open_regular
from cornpipe.shards.imageio import ImageRejected, encode_jpeg, prepare_image

CHUNK = 4  # inputs per task sent to a worker
IN_FLIGHT_PER_WORKER = 2 * CHUNK  # prepared images per worker that the main process may hold
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


@dataclass(frozen=True)
class Prepared:
    """A worker's result for one input: what convert keeps about it and the bytes to stage."""

    sha256: str  # of the input file's bytes
    orig_width: int
    orig_height: int
    width: int
    height: int
    repairs: tuple[str, ...]
    jpeg: bytes  # the tar JPEG (and the jpg-mode .beton's)
    pixels: bytes | None  # (H, W, 3) uint8 RGB, only when the .beton stores this image raw


def prepare_one(path: str, max_resolution: int, max_pixels: int, jpeg_quality: int,
                raw_limit: int) -> Prepared | str:
    """Runs in a worker: file -> Prepared, or the reason it is rejected. Pixels are returned only
    when they take at most `raw_limit` bytes (the .beton stores those raw; -1: none)."""
    try:
        with open_regular(path) as f:  # discovery rejected pipes and devices; one swapped in since must not block
            data = f.read()
    except NotRegularFile as exc:
        return exc.reason
    except OSError as exc:
        return f"cannot read file ({exc.strerror or exc})"
    try:
        img = prepare_image(data, max_resolution=max_resolution, max_pixels=max_pixels)
        del data  # the encoded input is not needed past here: one image at a time per worker
        jpeg = encode_jpeg(img.pixels, jpeg_quality)
    except ImageRejected as exc:
        return str(exc)
    except MemoryError:
        return "image too large to decode in memory"
    except Exception as exc:  # a decoder bug on one odd file must not stop the survey
        return f"cannot decode image ({type(exc).__name__}: {exc})"
    h, w = img.pixels.shape[:2]
    pixels = np.ascontiguousarray(img.pixels, dtype=np.uint8).tobytes() if h * w * 3 <= raw_limit else None
    return Prepared(img.sha256, int(img.orig_width), int(img.orig_height), int(w), int(h),
                    tuple(img.repairs), jpeg, pixels)


def _prepare_chunk(tasks: Sequence[tuple]) -> list[Prepared | str]:
    return [prepare_one(*t) for t in tasks]


def _init_worker(lock_fd: int, parent_pid: int) -> None:
    """Tie the worker's life to convert's and leave signals and the output lock to convert."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl: the closed lock below still lets the next run reclaim the folder
    if os.getppid() != parent_pid:  # convert died before prctl took effect
        os._exit(1)
    if lock_fd >= 0:
        # the flock belongs to the open file, shared by every fork that holds a copy of the fd: a
        # worker's copy would keep the lock (and block every rerun) after convert is killed
        os.close(lock_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM are convert's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def map_prepare(tasks: Sequence[tuple], workers: int, lock_fd: int = -1) -> Iterator[Prepared | str]:
    """Results of `prepare_one` in task order, computed by `workers` processes, with a bounded number
    of results in flight (see the module doc)."""
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield prepare_one(*t)
        return
    # fork: workers start in milliseconds and need nothing from __main__. gc.freeze keeps the
    # children's garbage collector from touching (and so copying) every page of the parent's heap.
    method = "fork" if "fork" in get_all_start_methods() else None
    gc.freeze()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context(method),
                               initializer=_init_worker, initargs=(lock_fd, os.getpid()))
    starts = iter(range(0, len(tasks), CHUNK))
    pending: deque = deque()

    def submit() -> None:
        start = next(starts, None)
        if start is not None:
            pending.append(pool.submit(_prepare_chunk, tasks[start:start + CHUNK]))

    try:
        for _ in range(2 * workers):
            submit()
        while pending:
            future = pending.popleft()
            submit()
            yield from future.result()
    except BrokenProcessPool as exc:
        raise ConvertError("a decoding worker died (killed by the system: out of memory?); "
                           "retry with fewer --workers") from exc
    finally:  # on an error or Ctrl-C in the consumer, drop queued work instead of finishing it
        pool.shutdown(wait=True, cancel_futures=True)
        gc.unfreeze()


@dataclass(frozen=True)
class StagedBytes:
    """Where one image's bytes are in the staging files."""

    pixel_offset: int  # -1: no pixels staged (the .beton stores this image as JPEG)
    pixel_size: int
    jpeg_offset: int
    jpeg_size: int


@dataclass(frozen=True)
class StagedSample:
    """Everything the writers need about one converted sample."""

    sample_id: int
    position: int
    grade: float
    source_id: int
    height: int
    width: int
    pixel_offset: int  # -1: not staged (the .beton stores this image as JPEG)
    jpeg_offset: int
    jpeg_size: int
    meta: dict  # the tar's .json member


class Staging:
    """Append-only files holding each prepared image's tar JPEG and (when needed) raw pixels."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.pixels_path = folder / "pixels.u8"
        self.jpeg_path = folder / "jpeg.bin"
        self._pixels = open(self.pixels_path, "wb")
        self._jpeg = open(self.jpeg_path, "wb")

    def add(self, prepared: Prepared) -> StagedBytes:
        """Store one image's bytes; the caller may then drop them from memory."""
        p_off, p_size = -1, 0
        if prepared.pixels is not None:
            p_off, p_size = self._pixels.tell(), len(prepared.pixels)
            self._pixels.write(prepared.pixels)
        j_off = self._jpeg.tell()
        self._jpeg.write(prepared.jpeg)
        return StagedBytes(p_off, p_size, j_off, len(prepared.jpeg))

    def close(self) -> None:
        self._pixels.close()
        self._jpeg.close()

    def size(self) -> int:
        return sum(p.stat().st_size for p in (self.pixels_path, self.jpeg_path) if p.exists())

    def remove(self) -> None:
        self.close()
        for p in (self.pixels_path, self.jpeg_path):
            p.unlink(missing_ok=True)
        self.folder.rmdir()
