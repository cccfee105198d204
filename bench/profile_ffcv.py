"""Where the `ffcv` backend's time goes, beside FFCV's own pipeline doing the same work (issue 12).

    python -m cornpipe.bench.profile_ffcv SHARDS [--image-size 224] [--batch-size 64] [--workers 2]

The work is `bench loaders --work same`: RandomResizedCrop (scale 0.35-1) to S px + horizontal flip +
normalise to float32 NCHW, over the train split's .beton. Two parts, both in this process:

1. stages -- each step alone, on one thread, over the split's images, with the crop boxes each side
   draws (cornpipe: loaders.pixels.augment's sampler; FFCV: its decoder's get_random_crop), in microseconds
   per image (the best of --repeats passes over every image, in batches of --batch-size):
   read (bytes out of the memory map), decode (libjpeg-turbo), crop-resize (cv::resize INTER_AREA),
   flip, normalise, NCHW copy, fresh output memory (first touch of newly allocated pages: per batch
   for the before path's outputs, per epoch for FFCV's own slot buffers, whose cost depends on the
   epoch's length), labels (cornpipe: labels_for + Batch per batch; FFCV: its int/float decoders).
   "ffcv before" is the uint8 + loaders.pixels.finish path (option fuse=False), "ffcv now" the decoder
   that normalises (the default on a CPU without colour jitter), "ffcv-native" bench.peers' pipeline.
2. pipelines -- each loader end to end with --workers threads, alternating for --rounds rounds of
   --seconds: images/s, process CPU time per image, and per image the FFCV epoch thread's wall time
   in its pipeline, the main thread's wait on FFCV's queue, and the main thread's own work. "ffcv
   fuse=False" is today's uint8 + loaders.pixels.finish path (jitter, CUDA and host-only batches take it).
Timings on a shared machine are noisy: compare columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba as nb
import numpy as np
import torch

STAGES = ("read", "decode", "crop-resize", "flip", "normalise", "NCHW copy", "fresh memory, per batch",
          "fresh memory, per epoch", "labels + collate")
SIDES = ("ffcv before", "ffcv now", "ffcv-native")  # stage columns
PIPELINES = ("ffcv", "ffcv fuse=False", "ffcv-native")


# ---------------------------------------------------------------------------------------------
# part 1: the stages, one thread


@functools.cache  # kept for the process: numba's finalizers of these dispatchers raise KeyErrors when collected
def _kernels() -> dict[str, Callable]:
    """Single-thread numba loops over a batch, calling what each pipeline calls."""
    from ffcv.fields.rgb_image import get_random_crop

    from cornpipe.loaders.backends import ffcv_ops as ops
    from cornpipe.loaders.pixels import pixel_kernels as px

    jit = nb.njit(nogil=True, error_model="numpy")
    imdecode, resize = ops._imdecode, ops._resize
    # compiled here, not inlined; fastmath as in the decoder's batch kernels
    normalise = nb.njit(nogil=True, error_model="numpy", fastmath=True)(px.normalise.py_func)
    read_os = jit(ops._read_os.py_func)
    random_crop = jit(get_random_crop)
    u32 = np.uint32

    @jit
    def read(mmap, ptrs, sizes, addrs):
        total = 0
        for a in addrs:
            data = read_os(a, mmap, ptrs, sizes)
            total += data[0] + data[data.size - 1]
        return total

    @jit
    def decode(mmap, ptrs, sizes, addrs, heights, widths, eighths, out):
        for i in range(len(addrs)):
            data = read_os(addrs[i], mmap, ptrs, sizes)
            h, w, m = heights[i], widths[i], eighths[i]
            imdecode(data.ctypes.data, np.uint64(data.size), u32(h), u32(w), out[i].ctypes.data, u32(h), u32(w),
                     u32(0), u32(0), u32(m), u32(8), np.uint8(0), np.uint8(0))

    @jit
    def crop_resize(decoded, rows, cols, boxes, dst):
        for i in range(len(rows)):
            t, left, b, r = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
            resize(0, decoded[i].ctypes.data, rows[i], cols[i], t, b, left, r, dst[i].ctypes.data,
                   dst.shape[1], dst.shape[2])

    @jit
    def flip_generic(src, dst, flags, copy_unflipped):  # numba slice copies, as FFCV's flip and `_place` before
        for i in range(len(flags)):
            if flags[i]:
                dst[i] = src[i, :, ::-1]
            elif copy_unflipped:
                dst[i] = src[i]

    @jit
    def normalise_fused(src, dst, flags, mean, inv_std):  # the fused decoder's pass: flip + normalise + NCHW
        for i in range(len(flags)):
            normalise(src[i], dst[i], flags[i] != 0, False, mean, inv_std, True)

    @jit
    def ffcv_crop(heights, widths, scale, ratio, seed):  # FFCV's get_random_crop, numba's generator
        np.random.seed(seed)
        out = np.empty((len(heights), 4), np.int64)
        for i in range(len(heights)):
            t, left, h, w = random_crop(heights[i], widths[i], scale, ratio)
            out[i, 0], out[i, 1], out[i, 2], out[i, 3] = t, left, t + h, left + w
        return out

    return {"read": read, "decode": decode, "crop_resize": crop_resize, "flip_generic": flip_generic,
            "normalise_fused": normalise_fused, "ffcv_crop": ffcv_crop}


def _best(fn: Callable[[], Any], repeats: int) -> float:
    return _best_of({"": fn}, repeats)[""]


def _best_of(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """The best wall time of each function over `repeats` calls, the functions taking turns (so that
    a busy moment of the machine does not land on one side only)."""
    for fn in fns.values():
        fn()  # compile / warm
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _scaled_boxes(boxes: np.ndarray, heights: np.ndarray, widths: np.ndarray, size: int):
    """cornpipe's decode scale (M/8) and its box in the scaled image's pixels, as ffcv_ops does."""
    from cornpipe.loaders.backends import ffcv_ops as ops

    top = np.clip(boxes[:, 0], 0, heights - 1)
    left = np.clip(boxes[:, 1], 0, widths - 1)
    bottom = np.minimum(np.maximum(top + boxes[:, 2], top + 1), heights)
    right = np.minimum(np.maximum(left + boxes[:, 3], left + 1), widths)
    m = np.array([ops._dct_eighths(int(b - t), int(r - left_), size)
                  for t, left_, b, r in zip(top, left, bottom, right, strict=True)], dtype=np.int64)
    rows, cols = (heights * m + 7) // 8, (widths * m + 7) // 8
    scaled = m < 8
    top = np.where(scaled, np.minimum((top * m + 4) // 8, rows - 1), top)
    left = np.where(scaled, np.minimum((left * m + 4) // 8, cols - 1), left)
    bottom = np.where(scaled, np.minimum(np.maximum((bottom * m + 4) // 8, top + 1), rows), bottom)
    right = np.where(scaled, np.minimum(np.maximum((right * m + 4) // 8, left + 1), cols), right)
    return m, rows, cols, np.stack([top, left, bottom, right], axis=1).astype(np.int64)


def _fault_us_per_mb(repeats: int) -> float:
    """Microseconds per MB to first touch freshly allocated memory, over writing memory already touched."""
    n = 32 * 2**20

    def fresh() -> None:
        torch.empty(n, dtype=torch.uint8).fill_(1)

    reused = torch.empty(n, dtype=torch.uint8)
    return max(0.0, (_best(fresh, repeats) - _best(lambda: reused.fill_(1), repeats)) / 32 * 1e6)


def profile_stages(root: Path, size: int, batch: int, repeats: int, images: int) -> dict[str, dict[str, float]]:
    """µs per image of each stage, per side (see the module doc)."""
    from ffcv.reader import Reader

    from cornpipe.bench.loader_bench import SAME_WORK
    from cornpipe.loaders.backends.ffcv_loader import BATCHES_AHEAD
    from cornpipe.loaders.base import IMAGENET
    from cornpipe.loaders.common import EpochLoader, augment_params, make_spec
    from cornpipe.loaders.pixels import finish_cpu
    from cornpipe.shards import fields as F
    from cornpipe.shards.shard_set import ShardSet

    shards = ShardSet(root)
    path = shards.beton_path("train")
    reader = Reader(str(path))
    meta = reader.metadata[f"f{list(reader.field_names).index(F.IMAGE)}"]
    table = reader.alloc_table
    order = np.argsort(table["ptr"])
    ptrs, sizes = table["ptr"][order], table["size"][order]
    mmap = np.memmap(str(path), dtype=np.uint8, mode="r")
    n = min(len(meta), images) // batch * batch
    if n == 0:
        raise SystemExit(f"{path} holds fewer than --batch-size {batch} images")
    addrs = meta["data_ptr"][:n].astype(np.uint64)
    heights, widths = meta["height"][:n].astype(np.int64), meta["width"][:n].astype(np.int64)
    k = _kernels()
    per = 1e6 / n  # seconds for n images -> µs per image
    out: dict[str, dict[str, float]] = {side: {} for side in SIDES}

    def all_sides(stage: str, value: float) -> None:
        for side in SIDES:
            out[side][stage] = value

    all_sides("read", _best(lambda: k["read"](mmap, ptrs, sizes, addrs), repeats) * per)

    # the crop boxes each side draws
    spec = make_spec("train", augment=SAME_WORK, image_size=size, batch_size=batch, oversample="none",
                     normalization=IMAGENET)
    hw = np.stack([heights, widths], axis=1)
    params = [augment_params(spec, hw[s:s + batch], 0, b // batch) for b, s in enumerate(range(0, n, batch))]
    ours = np.rint(np.concatenate([p.boxes for p in params])).astype(np.int64)
    hflip = np.concatenate([p.hflip for p in params]).astype(np.uint8)
    m, rows, cols, boxes = _scaled_boxes(ours, heights, widths, size)
    native_boxes = k["ffcv_crop"](heights, widths, np.array(SAME_WORK.scale), np.array(SAME_WORK.ratio), 0)
    native_flip = (np.random.default_rng(0).random(n) < 0.5).astype(np.uint8)

    biggest = int((heights * widths).max()) * 3
    decoded = np.zeros((n, biggest), np.uint8)
    decoded_full = np.zeros((n, biggest), np.uint8)
    def batched(fn: Callable[[slice], Any]) -> Callable[[], None]:
        return lambda: [fn(slice(s, s + batch)) for s in range(0, n, batch)]

    def stage(name: str, fns: dict[str, Callable[[], Any]], free: tuple[str, ...] = ()) -> None:
        """Time `fns` (side -> pass over the n images) in turns; sides in `free` do no work here."""
        for side, seconds in _best_of(fns, repeats).items():
            for one in side.split("|"):
                out[one][name] = seconds * per
        for side in free:
            out[side][name] = 0.0

    biggest = int((heights * widths).max()) * 3
    decoded = np.zeros((n, biggest), np.uint8)
    decoded_full = np.zeros((n, biggest), np.uint8)
    stage("decode", {
        "ffcv before|ffcv now": lambda: k["decode"](mmap, ptrs, sizes, addrs, heights, widths, m, decoded),
        "ffcv-native": lambda: k["decode"](mmap, ptrs, sizes, addrs, heights, widths, np.full(n, 8), decoded_full)})
    crops = np.zeros((n, size, size, 3), np.uint8)
    crops_native = np.zeros((n, size, size, 3), np.uint8)
    stage("crop-resize", {
        "ffcv before|ffcv now": lambda: k["crop_resize"](decoded, rows, cols, boxes, crops),
        "ffcv-native": lambda: k["crop_resize"](decoded_full, heights, widths, native_boxes, crops_native)})
    flipped = np.zeros((batch, size, size, 3), np.uint8)
    stage("flip", {
        "ffcv before": batched(lambda s: k["flip_generic"](crops[s], flipped, hflip[s], False)),
        "ffcv-native": batched(lambda s: k["flip_generic"](crops_native[s], flipped, native_flip[s], True))},
        free=("ffcv now",))  # folded into the normalising pass

    # normalise + layout
    mean = np.asarray(spec.normalization.mean, np.float32)
    inv_std = (1.0 / np.asarray(spec.normalization.std, np.float64)).astype(np.float32)
    planes = torch.empty((batch, 3, size, size), dtype=torch.uint8)
    floats = torch.empty((batch, 3, size, size), dtype=torch.float32)
    t_crops = torch.from_numpy(crops)
    with torch.no_grad():
        torch.set_num_threads(1)
        nb.set_num_threads(1)
        # loaders.pixels.finish_cpu's kernel into a reused output (finish_fused allocates it afresh: a row below)
        kernel, ones = finish_cpu._compiled(), np.ones((batch, 3), np.float32)
        no_flips, width = np.zeros((batch, 2), np.uint8), planes.shape[-1]
        flat_in, flat_out = planes.view(batch, 3, -1).numpy(), floats.view(batch, 3, -1).numpy()
        stage("normalise", {
            "ffcv before": batched(lambda s: kernel(flat_in, ones, no_flips, width, mean, inv_std, flat_out)),
            "ffcv now": batched(lambda s: k["normalise_fused"](crops[s], floats.numpy(), hflip[s], mean, inv_std)),
            "ffcv-native": _native_normalise(crops_native, batch)})
        stage("NCHW copy", {
            "ffcv before": batched(lambda s: planes.copy_(t_crops[s].permute(0, 3, 1, 2))),
            "ffcv-native": batched(lambda s: torch.from_numpy(crops_native[s]).permute(0, 3, 1, 2))},  # a view
            free=("ffcv now",))  # written as NCHW

    # memory touched for the first time: µs per MB (measured) x MB per image
    us_mb = _fault_us_per_mb(repeats)
    mb = 2.0**-20
    out_u8, out_f32 = size * size * 3 * mb, size * size * 3 * 4 * mb
    temp = float((heights * widths * 3).mean()) * mb  # the decode scratch each image fills
    slots = BATCHES_AHEAD + 2  # FFCV's batch slots, allocated afresh each epoch
    epoch_images = len(meta)
    touched = min(slots * batch, epoch_images) / epoch_images  # slot images an epoch touches, per image read
    out["ffcv before"]["fresh memory, per batch"] = (out_f32 + out_u8) * us_mb  # finish: float out + NCHW planes
    out["ffcv now"]["fresh memory, per batch"] = 0.0  # pooled output arrays
    out["ffcv-native"]["fresh memory, per batch"] = 0.0
    out["ffcv before"]["fresh memory, per epoch"] = (out_u8 + temp + out_u8) * touched * us_mb
    out["ffcv now"]["fresh memory, per epoch"] = 0.0  # slot buffers kept across epochs
    native_touched = min(slots * batch, epoch_images // batch * batch) / (epoch_images // batch * batch)
    out["ffcv-native"]["fresh memory, per epoch"] = (out_u8 + temp + out_u8 + out_f32) * native_touched * us_mb

    # labels: cornpipe's per-batch lookups; FFCV's decoders of the two label fields
    position, grade, sample_id = shards.labels("train")
    labels = EpochLoader(spec, position, grade, sample_id)
    index = np.arange(n)
    cornpipe_labels = _best(batched(lambda s: labels.labels_for(index[s])), repeats) * per
    out["ffcv before"]["labels + collate"] = out["ffcv now"]["labels + collate"] = cornpipe_labels
    out["ffcv-native"]["labels + collate"] = _native_labels(path, batch, repeats)
    out["_notes"] = {"fault_us_per_mb": us_mb, "images": n, "epoch_images": epoch_images,
                     "decode_eighths": np.bincount(m, minlength=9)[[1, 2, 4, 8]].tolist()}
    return out


def _native_normalise(crops: np.ndarray, batch: int) -> Callable[[], Any]:
    """A pass of FFCV's NormalizeImage CPU code over `crops`, compiled as FFCV compiles it for one thread."""
    from ffcv.pipeline.compiler import Compiler
    from ffcv.transforms import NormalizeImage

    from cornpipe.loaders.base import MEAN_255, STD_255

    Compiler.set_num_threads(1)
    op = NormalizeImage(np.array(MEAN_255), np.array(STD_255), np.float32)
    code = Compiler.compile(op.generate_code_cpu())
    result = np.empty((batch, *crops.shape[1:]), np.float32)
    index = np.arange(batch)
    return lambda: [code(crops[s:s + batch], result, index) for s in range(0, len(crops) // batch * batch, batch)]


def _native_labels(path: Path, batch: int, repeats: int) -> float:
    """µs per image of an FFCV Loader that decodes only position and grade (one thread), epoch thread and queue included."""
    from ffcv.fields.basics import FloatDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    from cornpipe.shards import fields as F

    pipelines = {F.IMAGE: None, F.SAMPLE_ID: None, F.SOURCE_ID: None,
                 F.POSITION: [IntDecoder(), ToTensor()], F.GRADE: [FloatDecoder(), ToTensor()]}
    loader = Loader(str(path), batch_size=batch, num_workers=1, order=OrderOption.RANDOM, os_cache=True,
                    drop_last=True, pipelines=pipelines, seed=0)
    count = len(loader) * batch

    def epoch() -> None:
        for b in loader:
            b[0].view(-1).long()

    return _best(epoch, repeats) * 1e6 / max(1, count)


# ---------------------------------------------------------------------------------------------
# part 2: the pipelines, end to end


@dataclass
class _Clock:
    """Seconds the FFCV epoch thread spends in its pipeline and the consumer waits on its queue."""

    pipeline: float = 0.0
    wait: float = 0.0
    batches: list[int] = field(default_factory=list)


def _instrument() -> _Clock:
    from ffcv.loader.epoch_iterator import EpochIterator

    clock = _Clock()
    run_pipeline, next_ = EpochIterator.run_pipeline, EpochIterator.__next__

    def timed_pipeline(self, *args, **kw):
        start = time.perf_counter()
        try:
            return run_pipeline(self, *args, **kw)
        finally:
            clock.pipeline += time.perf_counter() - start

    def timed_next(self):
        start = time.perf_counter()
        try:
            return next_(self)
        finally:
            clock.wait += time.perf_counter() - start

    EpochIterator.run_pipeline, EpochIterator.__next__ = timed_pipeline, timed_next
    return clock


def _build(name: str, root: Path, size: int, batch: int, workers: int) -> Any:
    from cornpipe.bench.loader_bench import SAME_WORK
    from cornpipe.bench.peers import build_peer
    from cornpipe.loaders import make_loader
    from cornpipe.loaders.base import IMAGENET

    if name == "ffcv-native":
        return build_peer("ffcv-native", str(root), split="train", batch_size=batch, image_size=size,
                          workers=workers, device="cpu", seed=0)
    options = {"fuse": name == "ffcv"}
    return make_loader(root, "train", backend="ffcv", batch_size=batch, image_size=size, workers=workers,
                       device="cpu", augment=SAME_WORK, options=options, oversample="none", normalization=IMAGENET)


def profile_pipelines(root: Path, size: int, batch: int, workers: int, seconds: float,
                      rounds: int) -> dict[str, list[dict[str, float]]]:
    clock = _instrument()
    loaders = {name: _build(name, root, size, batch, workers) for name in PIPELINES}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in PIPELINES}
    try:
        for lo in loaders.values():  # warm-up: JIT compiles, page cache
            for _ in _take(lo, 2 * len(lo)):
                pass
        for _ in range(rounds):
            for name, lo in loaders.items():
                clock.pipeline = clock.wait = 0.0
                cpu0, t0 = _cpu(), time.perf_counter()
                images = 0
                for b in _take(lo, None, deadline=t0 + seconds):
                    images += b.images.shape[0]
                wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
                results[name].append({
                    "images_per_s": images / wall, "cpu_us": cpu / images * 1e6,
                    "pipeline_us": clock.pipeline / images * 1e6, "wait_us": clock.wait / images * 1e6,
                    "main_work_us": (wall - clock.wait) / images * 1e6})
    finally:
        for lo in loaders.values():
            lo.close()
    return results


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _take(loader: Any, count: int | None, deadline: float | None = None):
    epoch, done = 0, 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch
            done += 1
            if (count is not None and done >= count) or (deadline is not None and time.perf_counter() >= deadline):
                return
        epoch += 1


# ---------------------------------------------------------------------------------------------


def _print_stages(stages: dict[str, dict[str, float]]) -> None:
    print(f"stages, µs per image, one thread ({stages['_notes']['images']} images)")
    print(f"{'stage':<26}" + "".join(f"{s:>15}" for s in SIDES))
    for stage in STAGES:
        print(f"{stage:<26}" + "".join(f"{stages[s].get(stage, float('nan')):>15.1f}" for s in SIDES))
    print(f"{'sum':<26}" + "".join(f"{sum(stages[s].values()):>15.1f}" for s in SIDES))
    print(f"notes: {stages['_notes']}")


def _print_pipelines(results: dict[str, list[dict[str, float]]]) -> None:
    keys = ("images_per_s", "cpu_us", "pipeline_us", "wait_us", "main_work_us")
    print("pipelines (median of rounds; µs per image: CPU of the process, FFCV thread in its pipeline, "
          "main thread waiting on the queue, main thread's own work)")
    print(f"{'loader':<16}" + "".join(f"{k:>14}" for k in keys))
    for name, rows in results.items():
        print(f"{name:<16}" + "".join(f"{float(np.median([r[k] for r in rows])):>14.1f}" for k in keys))
    base = float(np.median([r["images_per_s"] for r in results["ffcv-native"]]))
    for name in PIPELINES[:2]:
        rate = float(np.median([r["images_per_s"] for r in results[name]]))
        print(f"{name} × ffcv-native: {rate / base:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cornpipe.bench.profile_ffcv", description=__doc__.split("\n")[0])
    parser.add_argument("shards", type=Path, help="a shard set with .beton files")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=512, help="images of the stage timings (at most the split)")
    parser.add_argument("--repeats", type=int, default=5, help="passes per stage (the best counts)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per pipeline and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", choices=("stages", "pipelines"), help="leave one part out")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {}
    if args.skip != "stages":
        report["stages"] = profile_stages(args.shards, args.image_size, args.batch_size, args.repeats, args.images)
        _print_stages(report["stages"])
    if args.skip != "pipelines":
        report["pipelines"] = profile_pipelines(args.shards, args.image_size, args.batch_size, args.workers,
                                                args.seconds, args.rounds)
        _print_pipelines(report["pipelines"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
