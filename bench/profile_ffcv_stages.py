"""Part 1 of `python -m cornpipe.bench.profile_ffcv`: the stages of the `ffcv` backend and of FFCV's own
pipeline, each step alone on one thread (what each column means: bench/profile_ffcv.py)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba as nb
import numpy as np
import torch

STAGES = ("read", "decode", "crop-resize", "flip", "normalise", "NCHW copy", "fresh memory, per batch",
          "fresh memory, per epoch", "labels + collate")
SIDES = ("ffcv before", "ffcv now", "ffcv-native")  # stage columns


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
    from cornpipe.loaders.base import IMAGENET
    from cornpipe.loaders.common import augment_params, make_spec
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
    floats = torch.empty((batch, 3, size, size), dtype=torch.float32)
    with torch.no_grad():
        torch.set_num_threads(1)
        nb.set_num_threads(1)
        # loaders.pixels.finish_cpu's kernel, as the fuse=False path runs it (HWC crops in, NCHW float32
        # out), into a reused output
        kernel, ones = finish_cpu._compiled(), np.ones((batch, 3), np.float32)
        no_flips = np.zeros((batch, 2), np.uint8)
        stage("normalise", {
            "ffcv before": batched(lambda s: kernel(crops[s], ones, no_flips, mean, inv_std, True, floats.numpy())),
            "ffcv now": batched(lambda s: k["normalise_fused"](crops[s], floats.numpy(), hflip[s], mean, inv_std)),
            "ffcv-native": _native_normalise(crops_native, batch)})
        stage("NCHW copy", {
            "ffcv-native": batched(lambda s: torch.from_numpy(crops_native[s]).permute(0, 3, 1, 2))},  # a view
            free=("ffcv before", "ffcv now"))  # both kernels write NCHW themselves

    us_mb = _fresh_memory(out, heights, widths, size, batch, len(meta), repeats)
    # labels: cornpipe's per-batch lookups; FFCV's decoders of the two label fields
    cornpipe_labels = _cornpipe_labels(shards, spec, batched, n, repeats) * per
    out["ffcv before"]["labels + collate"] = out["ffcv now"]["labels + collate"] = cornpipe_labels
    out["ffcv-native"]["labels + collate"] = _native_labels(path, batch, repeats)
    out["_notes"] = {"fault_us_per_mb": us_mb, "images": n, "epoch_images": len(meta),
                     "decode_eighths": np.bincount(m, minlength=9)[[1, 2, 4, 8]].tolist()}
    return out


def _cornpipe_labels(shards: Any, spec: Any, batched: Callable[[Callable[[slice], Any]], Callable[[], None]],
                     n: int, repeats: int) -> float:
    """Seconds for the loader's per-batch label lookups over the first `n` train rows."""
    from cornpipe.loaders.common import EpochLoader

    position, grade, sample_id = shards.labels("train")
    labels = EpochLoader(spec, position, grade, sample_id)
    index = np.arange(n)
    return _best(batched(lambda s: labels.labels_for(index[s])), repeats)


def _fresh_memory(out: dict[str, dict[str, float]], heights: np.ndarray, widths: np.ndarray, size: int,
                  batch: int, epoch_images: int, repeats: int) -> float:
    """Fill each side's first-touch memory cost per image (per batch and per epoch); returns µs per MB."""
    from cornpipe.loaders.backends.ffcv_loader import BATCHES_AHEAD

    # memory touched for the first time: µs per MB (measured) x MB per image
    us_mb = _fault_us_per_mb(repeats)
    mb = 2.0**-20
    out_u8, out_f32 = size * size * 3 * mb, size * size * 3 * 4 * mb
    temp = float((heights * widths * 3).mean()) * mb  # the decode scratch each image fills
    slots = BATCHES_AHEAD + 2  # FFCV's batch slots, allocated afresh each epoch
    touched = min(slots * batch, epoch_images) / epoch_images  # slot images an epoch touches, per image read
    out["ffcv before"]["fresh memory, per batch"] = (out_f32 + out_u8) * us_mb  # finish: float out + NCHW planes
    out["ffcv now"]["fresh memory, per batch"] = 0.0  # pooled output arrays
    out["ffcv-native"]["fresh memory, per batch"] = 0.0
    out["ffcv before"]["fresh memory, per epoch"] = (out_u8 + temp + out_u8) * touched * us_mb
    out["ffcv now"]["fresh memory, per epoch"] = 0.0  # slot buffers kept across epochs
    native_touched = min(slots * batch, epoch_images // batch * batch) / (epoch_images // batch * batch)
    out["ffcv-native"]["fresh memory, per epoch"] = (out_u8 + temp + out_u8 + out_f32) * native_touched * us_mb
    return us_mb


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
