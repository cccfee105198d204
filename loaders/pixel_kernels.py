"""Per-image pixel passes of the `ffcv` decoder (loaders.ffcv_ops), numba, one (S, S, 3) uint8 crop at a time.

They run inside FFCV's batch kernel, on its threads, while the crop is still in the core's cache:
flips and quarter turns, and the last step of a CPU batch -- colour jitter and normalisation to
float32, NCHW or NHWC -- with the definition of `loaders.fused` (which finishes uint8 batches of the
other paths): brightness, contrast around the mean grey of the brightened image, saturation around
each pixel's grey, each step clamped to [0, 255], then (x - mean) * (1 / std).

Measured per 224 px image on one core of the 2-core test VM (a Xeon with AVX-512), numba with
fastmath (the batch kernels are compiled with it), flipped or not:

- `normalise`: ~32-36 us (before: ~130 us flipped, reading the row backwards with a signed index;
  numba's `dst[:] = src[:, ::-1]`, FFCV's RandomHorizontalFlip, ~240 us).
- `jitter_normalise`: ~110 us, of which the contrast centre ~31 us. As one loop with every step per
  pixel it was ~480 us: here each row is first jittered into four float32 row buffers (r, g, b
  scaled by the saturation factor, and the saturation's grey term), then written out, so that no
  loop has a branch inside and all of them vectorise. The contrast centre is summed row by row
  (float32 within a row, float64 across rows): summed in blocks of 4096 pixels, as `loaders.fused`
  does, it did not vectorise here (~100 us).
- `copy_flipped` (uint8 crops): ~20 us (a slice assignment ~84 us).

Every loop is a plain case of its own: a branch inside a pixel loop stops it vectorising (~1.7x).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from cornpipe.loaders.fused import GREY_WEIGHTS

# Inlined into the batch kernels (numba IR inlining, before typing): no separate dispatcher per
# helper, whose overloads numba's parfor lowering corrupted when two kernels compiled the same helper
# (seen as a KeyError of the helper's signature).
jit = nb.njit(nogil=True, cache=True, error_model="numpy", inline="always")

_WR, _WG, _WB = GREY_WEIGHTS
# Indices run unsigned where a row is walked backwards: a signed index makes numba check for negative
# (wrap-around) indices, which stops the loop vectorising (a reversed float32 row: 155 vs 15 us).
_U = np.uint64


@jit
def copy_flipped(src, dst, hflip, vflip):
    """dst = vflip(hflip(src)) for (S, S, 3) uint8, row by row (numba's `dst[:] = src[:, ::-1]` is a
    generic strided copy, ~4x slower)."""
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
            for p in range(3 * s):  # (a slice assignment is numba's generic copy: ~4x slower)
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
def contrast_shift(src, bf, cf):
    """(1 - cf) * the mean grey of the brightened, clamped (S, S, 3) uint8 image: the contrast step's
    constant term. bf >= 0. With bf <= 1 nothing clamps and the mean is bf * the mean grey of the
    image, from exact integer channel sums (~21 us against ~31 us in float32)."""
    zero, top, one = np.float32(0.0), np.float32(255.0), np.float32(1.0)
    wr, wg, wb = np.float32(_WR), np.float32(_WG), np.float32(_WB)
    s, n = src.shape[1], max(src.shape[0] * src.shape[1], 1)
    u0, u1, u2, u3 = _U(0), _U(1), _U(2), _U(3)
    if bf <= one:
        sr, sg, sb = 0, 0, 0
        for y in range(src.shape[0]):
            row = src[y].reshape(3 * s)
            a0, a1, a2 = np.uint32(0), np.uint32(0), np.uint32(0)  # < 2**32 for rows up to 16 M pixels
            for x in range(u0, _U(s)):
                a0 += np.uint32(row[u3 * x])
                a1 += np.uint32(row[u3 * x + u1])
                a2 += np.uint32(row[u3 * x + u2])
            sr, sg, sb = sr + a0, sg + a1, sb + a2
        total = (_WR * sr + _WG * sg + _WB * sb) * np.float64(bf)
        return np.float32(total / n) * (one - cf)
    total = 0.0  # float64 across rows, float32 (vectorised) within one
    for y in range(src.shape[0]):
        row = src[y].reshape(3 * s)
        part = zero
        for x in range(u0, _U(s)):
            r = min(np.float32(row[u3 * x]) * bf, top)
            g = min(np.float32(row[u3 * x + u1]) * bf, top)
            b = min(np.float32(row[u3 * x + u2]) * bf, top)
            part += wr * r + wg * g + wb * b
        total += part
    return np.float32(total / n) * (one - cf)


@jit
def jitter_normalise(src, dst, hflip, vflip, factors, mean, inv_std, planar):
    """`normalise` after the colour jitter of `factors` (brightness, contrast, saturation; float32)."""
    s = src.shape[1]
    zero, top, one = np.float32(0.0), np.float32(255.0), np.float32(1.0)
    # v >= 0, so clamp(v * bf) == min(v * max(bf, 0), 255): one clamp fewer per value
    bf, cf, sf = max(factors[0], zero), factors[1], factors[2]
    wr, wg, wb = np.float32(_WR), np.float32(_WG), np.float32(_WB)
    shift = contrast_shift(src, bf, cf) if cf != one else zero
    keep = one - sf
    m0, m1, m2 = mean[0], mean[1], mean[2]
    i0, i1, i2 = inv_std[0], inv_std[1], inv_std[2]
    last, u0, u1, u2, u3 = _U(s - 1), _U(0), _U(1), _U(2), _U(3)
    for y in range(src.shape[0]):
        row = (src[src.shape[0] - 1 - y] if vflip else src[y]).reshape(3 * s)
        if planar:
            d0, d1, d2 = dst[0, y], dst[1, y], dst[2, y]
            if hflip:
                for x in range(u0, _U(s)):
                    r = min(max(min(np.float32(row[u3 * x]) * bf, top) * cf + shift, zero), top)
                    g = min(max(min(np.float32(row[u3 * x + u1]) * bf, top) * cf + shift, zero), top)
                    b = min(max(min(np.float32(row[u3 * x + u2]) * bf, top) * cf + shift, zero), top)
                    grey = (wr * r + wg * g + wb * b) * keep
                    q = last - x
                    d0[q] = (min(max(r * sf + grey, zero), top) - m0) * i0
                    d1[q] = (min(max(g * sf + grey, zero), top) - m1) * i1
                    d2[q] = (min(max(b * sf + grey, zero), top) - m2) * i2
            else:
                for x in range(u0, _U(s)):
                    r = min(max(min(np.float32(row[u3 * x]) * bf, top) * cf + shift, zero), top)
                    g = min(max(min(np.float32(row[u3 * x + u1]) * bf, top) * cf + shift, zero), top)
                    b = min(max(min(np.float32(row[u3 * x + u2]) * bf, top) * cf + shift, zero), top)
                    grey = (wr * r + wg * g + wb * b) * keep
                    d0[x] = (min(max(r * sf + grey, zero), top) - m0) * i0
                    d1[x] = (min(max(g * sf + grey, zero), top) - m1) * i1
                    d2[x] = (min(max(b * sf + grey, zero), top) - m2) * i2
        else:
            out = dst[y].reshape(3 * s)
            if hflip:
                for x in range(u0, _U(s)):
                    r = min(max(min(np.float32(row[u3 * x]) * bf, top) * cf + shift, zero), top)
                    g = min(max(min(np.float32(row[u3 * x + u1]) * bf, top) * cf + shift, zero), top)
                    b = min(max(min(np.float32(row[u3 * x + u2]) * bf, top) * cf + shift, zero), top)
                    grey = (wr * r + wg * g + wb * b) * keep
                    q = u3 * (last - x)
                    out[q] = (min(max(r * sf + grey, zero), top) - m0) * i0
                    out[q + u1] = (min(max(g * sf + grey, zero), top) - m1) * i1
                    out[q + u2] = (min(max(b * sf + grey, zero), top) - m2) * i2
            else:
                for x in range(u0, _U(s)):
                    r = min(max(min(np.float32(row[u3 * x]) * bf, top) * cf + shift, zero), top)
                    g = min(max(min(np.float32(row[u3 * x + u1]) * bf, top) * cf + shift, zero), top)
                    b = min(max(min(np.float32(row[u3 * x + u2]) * bf, top) * cf + shift, zero), top)
                    grey = (wr * r + wg * g + wb * b) * keep
                    out[u3 * x] = (min(max(r * sf + grey, zero), top) - m0) * i0
                    out[u3 * x + u1] = (min(max(g * sf + grey, zero), top) - m1) * i1
                    out[u3 * x + u2] = (min(max(b * sf + grey, zero), top) - m2) * i2
