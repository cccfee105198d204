"""The decode-only ceiling: how fast this machine turns the shard set's JPEGs into pixels.

Every core decodes the same JPEG bytes the loaders read (via `ShardSet.read_image_bytes`), with
libjpeg-turbo (Pillow's or OpenCV's build of it), no augmentation, no batching, no copies to a
device. The bytes are read into memory before the clock starts, so the number is decode alone: a
jpg-mode loader can only beat it by decoding less (e.g. DALI's region-of-interest decode).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

from cornpipe.bench.machine import usable_cores
from cornpipe.errors import LoaderError

DECODERS: tuple[str, ...] = ("pil", "cv2")


def _pil_decoder() -> Callable[[bytes], Any]:
    from PIL import Image

    def decode(data: bytes) -> Any:
        image = Image.open(io.BytesIO(data))
        if image.mode != "RGB":
            image = image.convert("RGB")
        image.load()
        return image

    return decode


def _cv2_decoder() -> Callable[[bytes], Any]:
    import cv2
    import numpy as np

    cv2.setNumThreads(1)  # one decode per core, like every other process in this pool

    def decode(data: bytes) -> Any:
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)

    return decode


def _turbo(decoder: str) -> bool | None:
    """Whether the decoder's JPEG library is libjpeg-turbo (None: cannot tell)."""
    if decoder != "pil":
        return None  # OpenCV's wheels bundle libjpeg-turbo, but do not say so at run time
    from PIL import features

    return bool(features.check_feature("libjpeg_turbo"))


def make_decoder(name: str) -> Callable[[bytes], Any]:
    if name == "pil":
        return _pil_decoder()
    if name == "cv2":
        try:
            return _cv2_decoder()
        except ImportError as exc:
            raise LoaderError("the cv2 decoder needs OpenCV: pip install opencv-python") from exc
    raise LoaderError(f"unknown decoder {name!r}; choose from {', '.join(DECODERS)}")


def _worker(root: str, split: str, rows: list[int], decoder: str, seconds: float,
            barrier: Any, results: Any) -> None:
    try:
        _decode_loop(root, split, rows, decoder, seconds, barrier, results)
    except Exception as exc:
        barrier.abort()  # the others must not wait for this one
        results.put(("error", f"{type(exc).__name__}: {exc}".splitlines()[0], 0.0))


def _decode_loop(root: str, split: str, rows: list[int], decoder: str, seconds: float,
                 barrier: Any, results: Any) -> None:
    from cornpipe.shards.shard_set import ShardSet

    shards = ShardSet(root)
    blobs = [shards.read_image_bytes(split, row) for row in rows]
    decode = make_decoder(decoder)
    for blob in blobs[:2]:
        decode(blob)  # warm-up: first-call costs (imports, allocator) stay out of the timing
    barrier.wait(timeout=300)
    start = time.perf_counter()
    count, deadline = 0, start + seconds
    while time.perf_counter() < deadline:
        for blob in blobs:
            decode(blob)
            count += 1
            if count % 8 == 0 and time.perf_counter() >= deadline:
                break
    results.put((count, time.perf_counter() - start, sum(len(b) for b in blobs) / len(blobs)))


def decode_ceiling(root: str, split: str = "train", *, workers: int | None = None, seconds: float = 3.0,
                   decoder: str = "pil", max_images: int = 2000) -> dict[str, Any]:
    """Images/s decoding the split's JPEGs on `workers` processes (default: every usable core).

    The JPEGs are the tar shards' (present in every write mode; in jpg mode the .beton holds the
    same bytes).
    Each worker holds up to max_images/workers of the split's images in memory and decodes them in
    a loop for `seconds`; all workers start together after a barrier.
    """
    from cornpipe.shards.shard_set import ShardSet

    shards = ShardSet(root)
    n = shards.count(split)
    if n == 0:
        raise LoaderError(f"{root}: split {split!r} has no samples")
    make_decoder(decoder)  # fail here, not in a worker, when the decoder is unavailable
    workers = workers or usable_cores()
    rows = list(range(min(n, max_images)))
    if len(rows) >= workers:
        shares = [rows[w::workers] for w in range(workers)]
    else:
        shares = [rows] * workers  # a tiny set: every worker decodes all of it
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(root), split, share, decoder, seconds, barrier, results),
                         daemon=True) for share in shares]
    for proc in procs:
        proc.start()
    outcomes = []
    try:
        for _ in procs:
            outcomes.append(results.get(timeout=seconds + 120))
    except Exception as exc:  # queue.Empty: a worker died (its traceback is on stderr)
        raise LoaderError(f"decode ceiling: a worker gave no result ({type(exc).__name__})") from exc
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
    errors = [e for tag, e, _ in outcomes if tag == "error"]
    if errors:
        errors.sort(key=lambda e: e.startswith("BrokenBarrierError"))  # the cause, not its echoes
        raise LoaderError(f"decode ceiling: {errors[0]}")
    count = sum(c for c, _, _ in outcomes)
    elapsed = max(e for _, e, _ in outcomes)
    return {
        "backend": "ceiling",
        "mode": "jpg",
        "device": "cpu",
        "decoder": decoder,
        "workers": workers,
        "images": count,
        "seconds": elapsed,
        "images_per_s": count / elapsed,
        "mean_jpeg_bytes": sum(b for _, _, b in outcomes) / len(outcomes),
        "libjpeg_turbo": _turbo(decoder),
    }


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    return decode_ceiling(spec["root"], spec.get("split", "train"), workers=spec.get("workers"),
                          seconds=spec.get("seconds", 3.0), decoder=spec.get("decoder", "pil"))


if __name__ == "__main__":  # a child of bench.isolate.run_isolated
    from cornpipe.bench.isolate import child_main

    child_main(_measure)
