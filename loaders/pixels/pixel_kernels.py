"""Per-image pixel passes, numba, one (S, S, 3) uint8 crop at a time: the last step of every CPU batch.

The `ffcv` decoder (loaders.backends.ffcv_ops) runs them inside FFCV's batch kernel, on its threads, while the
crop is still in the core's cache; `loaders.pixels.finish_cpu` runs them over the uint8 batches of the other
backends, images in parallel; the dali jitter operator per image. Flips and quarter turns, then
colour jitter and normalisation to float32, NCHW or NHWC: brightness, contrast around the mean grey
of the brightened image, saturation around each pixel's grey, each step clamped to [0, 255], then
(x - mean) * (1 / std) -- the definition of `loaders.pixels.finish`'s tensor ops, which the tests hold
these to. Each is written so that its loops vectorise (timings of every choice: docs/loaders.md).

Every loop is a plain case of its own: a branch inside a pixel loop stops it vectorising.
Kernels that inline these are cached by numba on their own file only: `fresh_cache` keeps them fresh.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import TypeVar

import numba as nb
import numpy as np

from cornpipe.loaders.base import GREY_WEIGHTS

# Inlined into the batch kernels (numba IR inlining, before typing): no separate dispatcher per
# helper, whose overloads numba's parfor lowering corrupted when two kernels compiled the same helper
# (seen as a KeyError of the helper's signature).
jit = nb.njit(nogil=True, cache=True, error_model="numpy", inline="always")

D = TypeVar("D")


@functools.cache
def _source_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fresh_cache(dispatcher: D, *sources: str) -> D:
    """`dispatcher` (numba, cache=True), its on-disk cache emptied when a file of `sources`
    (default: this one) changed since the cache was written; returned for chaining.

    numba keys a cached kernel on its own file only: a kernel that inlines these passes would load
    its old machine code after they change (seen as 1-ulp differences between two ffcv kernels, one
    compiled before and one after an edit here). The sources' digest is kept beside numba's index.
    """
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    index = getattr(cache_file, "_index_path", None)
    if index is None:  # caching off, or a numba whose cache looks different: nothing to keep fresh
        return dispatcher
    digest = "\n".join(_source_digest(s) for s in (sources or (__file__,)))
    stamp = Path(f"{index}.sources")
    try:
        if stamp.read_text() == digest:
            return dispatcher
    except OSError:
        pass
    try:
        dispatcher._cache.flush()  # an empty index: the next call compiles and saves anew
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest)
    except OSError:  # a read-only cache directory: numba does not save there either
        pass
    return dispatcher


_WR, _WG, _WB = GREY_WEIGHTS
# Indices run unsigned where a row is walked backwards: a signed index makes numba check for negative
# (wrap-around) indices, which stops the loop vectorising.
_U = np.uint64


@jit
def copy_flipped(src, dst, hflip, vflip):
    """dst = vflip(hflip(src)) for (S, S, 3) uint8, row by row (numba's `dst[:] = src[:, ::-1]` is a
    generic strided copy, several times slower)."""
    s = src.shape[1]
    last, u0, u1, u2, u3 = _U(s - 1), _U(0), _U(1), _U(2), _U(3)
    for y in range(src.shape[0]):
        row = (src[src.shape[0] - 1 - y] if vflip else src[y]).reshape(3 * s)
        out = dst[y].reshape(3 * s)
        if hflip:
            for x in range(u0, _U(s)):
                q = u3 * (last - x)
                out[u3 * x], out[u3 * x + u1], out[u3 * x + u2] = row[q], row[q + u1], row[q + u2]
        else:
            for p in range(3 * s):  # (a slice assignment is numba's slower generic copy)
                out[p] = row[p]


@jit
def place(crop, dst, hflip, vflip, k):
    """dst = rot90^k(vflip(hflip(crop))), counter-clockwise quarter turns; square (S, S, 3) arrays."""
    if k == 0:
        copy_flipped(crop, dst, hflip, vflip)
        return
    img = crop
    if hflip:
        img = img[:, ::-1]
    if vflip:
        img = img[::-1]
    if k == 1:
        img = img.transpose((1, 0, 2))[::-1]
    elif k == 2:
        img = img[::-1, ::-1]
    else:
        img = img[::-1].transpose((1, 0, 2))
    dst[:] = img


@jit
def normalise(src, dst, hflip, vflip, mean, inv_std, planar):
    """dst = (vflip(hflip(src)) - mean) * inv_std: (S, S, 3) uint8 -> float32 (3, S, S) when `planar`,
    else (S, S, 3). Rows are read forwards as flat runs of bytes; a horizontal flip writes them backwards."""
    s = src.shape[1]
    last, u0, u1, u2, u3 = _U(s - 1), _U(0), _U(1), _U(2), _U(3)
    m0, m1, m2 = mean[0], mean[1], mean[2]
    i0, i1, i2 = inv_std[0], inv_std[1], inv_std[2]
    for y in range(src.shape[0]):
        row = (src[src.shape[0] - 1 - y] if vflip else src[y]).reshape(3 * s)
        if planar:
            d0, d1, d2 = dst[0, y], dst[1, y], dst[2, y]
            if hflip:
                for x in range(u0, _U(s)):
                    q = last - x
                    d0[q] = (np.float32(row[u3 * x]) - m0) * i0
                    d1[q] = (np.float32(row[u3 * x + u1]) - m1) * i1
                    d2[q] = (np.float32(row[u3 * x + u2]) - m2) * i2
            else:
                for x in range(s):
                    d0[x] = (np.float32(row[3 * x]) - m0) * i0
                    d1[x] = (np.float32(row[3 * x + 1]) - m1) * i1
                    d2[x] = (np.float32(row[3 * x + 2]) - m2) * i2
        else:
            out = dst[y].reshape(3 * s)
            if hflip:
                for x in range(u0, _U(s)):
                    q = u3 * (last - x)
                    out[q] = (np.float32(row[u3 * x]) - m0) * i0
                    out[q + u1] = (np.float32(row[u3 * x + u1]) - m1) * i1
                    out[q + u2] = (np.float32(row[u3 * x + u2]) - m2) * i2
            else:
                for x in range(s):
                    out[3 * x] = (np.float32(row[3 * x]) - m0) * i0
                    out[3 * x + 1] = (np.float32(row[3 * x + 1]) - m1) * i1
                    out[3 * x + 2] = (np.float32(row[3 * x + 2]) - m2) * i2


@jit
def _weighted_mean(acc, n):
    """The mean grey of an image from its per-column sums `acc` (3 * S: r, g, b of each column)."""
    sr, sg, sb = 0.0, 0.0, 0.0
    for x in range(acc.shape[0] // 3):
        sr += np.float64(acc[3 * x])
        sg += np.float64(acc[3 * x + 1])
        sb += np.float64(acc[3 * x + 2])
    return (_WR * sr + _WG * sg + _WB * sb) / n


@jit
def contrast_shift(src, bf, cf):
    """(1 - cf) * the mean grey of the brightened, clamped (S, S, 3) uint8 image: the contrast step's
    constant term. bf >= 0. Each row is added, as a flat run of 3 * S values, onto one row of column
    sums (unit stride: it vectorises, where summing r, g and b apart does not), weighted at the end.
    With bf <= 1 nothing clamps: exact integer sums, times bf (faster than float32 sums)."""
    top, one = np.float32(255.0), np.float32(1.0)
    width, n = 3 * src.shape[1], max(src.shape[0] * src.shape[1], 1)
    if bf <= one:
        sums = np.zeros(width, dtype=np.uint32)  # < 2**32 for images up to 16 M rows
        for y in range(src.shape[0]):
            row = src[y].reshape(width)
            for p in range(width):
                sums[p] += np.uint32(row[p])
        return np.float32(_weighted_mean(sums, n) * np.float64(bf)) * (one - cf)
    clamped = np.zeros(width, dtype=np.float32)  # float32 down a column, float64 across them
    for y in range(src.shape[0]):
        row = src[y].reshape(width)
        for p in range(width):
            clamped[p] += min(np.float32(row[p]) * bf, top)
    return np.float32(_weighted_mean(clamped, n)) * (one - cf)


@jit
def jitter_normalise(src, dst, hflip, vflip, factors, mean, inv_std, planar):
    """`normalise` after the colour jitter of `factors` (brightness, contrast, saturation; float32).

    Computed per pixel as fewer operations than the definition spells out, the same values within
    float rounding (tests hold it to the tensor ops):
    - brightness then contrast, min(v * bf, 255) * cf + shift clamped to [0, 255], is one monotone
      function of v: v * (bf * cf) + shift clamped to [lo, hi], the range of the definition's values;
    - the saturation's clamp and the normalisation fold into one: with inv_std > 0,
      (clamp(x, 0, 255) - m) * i == clamp(x * i - m * i, -m * i, (255 - m) * i);
    - the saturation's (1 - sf) is folded into the grey weights.
    """
    s = src.shape[1]
    zero, top, one = np.float32(0.0), np.float32(255.0), np.float32(1.0)
    bf, cf, sf = max(factors[0], zero), factors[1], factors[2]  # v >= 0: clamp(v * bf) == min(v * bf, 255)
    shift = contrast_shift(src, bf, cf) if cf != one else zero
    bc, capped = bf * cf, top * cf + shift  # capped: the value of every v with v * bf >= 255
    lo, hi = max(min(shift, capped), zero), min(max(shift, capped), top)
    keep = one - sf
    wr, wg, wb = np.float32(_WR) * keep, np.float32(_WG) * keep, np.float32(_WB) * keep
    i0, i1, i2 = inv_std[0], inv_std[1], inv_std[2]
    a0, a1, a2 = sf * i0, sf * i1, sf * i2
    c0, c1, c2 = -mean[0] * i0, -mean[1] * i1, -mean[2] * i2  # also the lowest outputs
    h0, h1, h2 = (top - mean[0]) * i0, (top - mean[1]) * i1, (top - mean[2]) * i2  # the highest
    last, u0, u1, u2, u3 = _U(s - 1), _U(0), _U(1), _U(2), _U(3)
    for y in range(src.shape[0]):
        row = (src[src.shape[0] - 1 - y] if vflip else src[y]).reshape(3 * s)
        if planar:
            d0, d1, d2 = dst[0, y], dst[1, y], dst[2, y]
            if hflip:
                for x in range(u0, _U(s)):
                    r = min(max(np.float32(row[u3 * x]) * bc + shift, lo), hi)
                    g = min(max(np.float32(row[u3 * x + u1]) * bc + shift, lo), hi)
                    b = min(max(np.float32(row[u3 * x + u2]) * bc + shift, lo), hi)
                    grey = wr * r + wg * g + wb * b
                    q = last - x
                    d0[q] = min(max(r * a0 + (grey * i0 + c0), c0), h0)
                    d1[q] = min(max(g * a1 + (grey * i1 + c1), c1), h1)
                    d2[q] = min(max(b * a2 + (grey * i2 + c2), c2), h2)
            else:
                for x in range(u0, _U(s)):
                    r = min(max(np.float32(row[u3 * x]) * bc + shift, lo), hi)
                    g = min(max(np.float32(row[u3 * x + u1]) * bc + shift, lo), hi)
                    b = min(max(np.float32(row[u3 * x + u2]) * bc + shift, lo), hi)
                    grey = wr * r + wg * g + wb * b
                    d0[x] = min(max(r * a0 + (grey * i0 + c0), c0), h0)
                    d1[x] = min(max(g * a1 + (grey * i1 + c1), c1), h1)
                    d2[x] = min(max(b * a2 + (grey * i2 + c2), c2), h2)
        else:
            out = dst[y].reshape(3 * s)
            if hflip:
                for x in range(u0, _U(s)):
                    r = min(max(np.float32(row[u3 * x]) * bc + shift, lo), hi)
                    g = min(max(np.float32(row[u3 * x + u1]) * bc + shift, lo), hi)
                    b = min(max(np.float32(row[u3 * x + u2]) * bc + shift, lo), hi)
                    grey = wr * r + wg * g + wb * b
                    q = u3 * (last - x)
                    out[q] = min(max(r * a0 + (grey * i0 + c0), c0), h0)
                    out[q + u1] = min(max(g * a1 + (grey * i1 + c1), c1), h1)
                    out[q + u2] = min(max(b * a2 + (grey * i2 + c2), c2), h2)
            else:
                for x in range(u0, _U(s)):
                    r = min(max(np.float32(row[u3 * x]) * bc + shift, lo), hi)
                    g = min(max(np.float32(row[u3 * x + u1]) * bc + shift, lo), hi)
                    b = min(max(np.float32(row[u3 * x + u2]) * bc + shift, lo), hi)
                    grey = wr * r + wg * g + wb * b
                    out[u3 * x] = min(max(r * a0 + (grey * i0 + c0), c0), h0)
                    out[u3 * x + u1] = min(max(g * a1 + (grey * i1 + c1), c1), h1)
                    out[u3 * x + u2] = min(max(b * a2 + (grey * i2 + c2), c2), h2)
