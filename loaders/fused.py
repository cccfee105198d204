"""Colour jitter + normalisation of a uint8 batch on the CPU in one fused numba pass.

The same definition as the tensor path (`loaders.augment.color_jitter_batch` then
`normalize_batch`): brightness, contrast (blend with the mean grey of the brightened image),
saturation (blend with each pixel's grey), each step clamped to [0, 255] as torchvision does, then
(x - MEAN_255) / STD_255. The tensor path makes ~10 float passes over the batch; on a CPU that was
the loaders' serial bottleneck (1-2 ms per 224 px image on the main thread, 40-60 % of an `ffcv`
epoch on 2 cores). Here each image is read as uint8 (twice when contrast is on: once for the
contrast centre) and written once as float32, in a loop that vectorises: ~3x less time per image.

numba ships with FFCV; without it (the bare GPU machine, where batches are finished on the GPU
anyway) `AVAILABLE` is False and callers use the tensor path. The kernel is serial and releases the
GIL, so it runs beside FFCV's and DALI's own threads without touching their thread pools.
"""

from __future__ import annotations

import numpy as np
import torch

from loaders.base import MEAN_255, STD_255

GREY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)  # ITU-R 601 luma

try:
    import numba as nb
except ImportError:  # pragma: no cover - exercised on machines without numba
    nb = None

AVAILABLE = nb is not None
_SUM_BLOCK = 4096  # pixels summed in float32 before adding to the float64 total


def _kernel(px, factors, mean, inv_std, out):  # pragma: no cover - compiled by numba
    """px (B, 3, H*W) uint8 planes, factors (B, 3) float32 -> out (B, 3, H*W) float32.

    Unit-stride planes and no table lookups: the pixel loop vectorises (fastmath: the inputs are
    uint8, so there are no NaNs or infinities for it to mishandle).
    """
    wr, wg, wb = np.float32(GREY_WEIGHTS[0]), np.float32(GREY_WEIGHTS[1]), np.float32(GREY_WEIGHTS[2])
    zero, top, one = np.float32(0.0), np.float32(255.0), np.float32(1.0)
    n, hw = px.shape[0], px.shape[2]
    m0, m1, m2 = mean[0], mean[1], mean[2]
    s0, s1, s2 = inv_std[0], inv_std[1], inv_std[2]
    for i in range(n):
        bf, cf, sf = factors[i, 0], factors[i, 1], factors[i, 2]
        pr, pg, pb = px[i, 0], px[i, 1], px[i, 2]
        shift = zero
        if cf != 1 and hw > 0:  # the contrast centre: mean grey of the brightened (clamped) image
            total = 0.0  # float64 across blocks; float32 (vectorised) within a block
            for start in range(0, hw, _SUM_BLOCK):
                part = zero
                for p in range(start, min(start + _SUM_BLOCK, hw)):
                    r = min(max(np.float32(pr[p]) * bf, zero), top)
                    g = min(max(np.float32(pg[p]) * bf, zero), top)
                    b = min(max(np.float32(pb[p]) * bf, zero), top)
                    part += wr * r + wg * g + wb * b
                total += part
            shift = np.float32(total / hw) * (one - cf)
        keep = one - sf
        o0, o1, o2 = out[i, 0], out[i, 1], out[i, 2]
        for p in range(hw):
            r = min(max(np.float32(pr[p]) * bf, zero), top)
            g = min(max(np.float32(pg[p]) * bf, zero), top)
            b = min(max(np.float32(pb[p]) * bf, zero), top)
            r = min(max(r * cf + shift, zero), top)
            g = min(max(g * cf + shift, zero), top)
            b = min(max(b * cf + shift, zero), top)
            grey = (wr * r + wg * g + wb * b) * keep
            o0[p] = (min(max(r * sf + grey, zero), top) - m0) * s0
            o1[p] = (min(max(g * sf + grey, zero), top) - m1) * s1
            o2[p] = (min(max(b * sf + grey, zero), top) - m2) * s2


_compiled = nb.njit(nogil=True, cache=True, fastmath=True, error_model="numpy")(_kernel) if AVAILABLE else None
_MEAN = np.asarray(MEAN_255, dtype=np.float32)
_INV_STD = (1.0 / np.asarray(STD_255, dtype=np.float64)).astype(np.float32)


def fused_finish(pixels: torch.Tensor, factors: np.ndarray | torch.Tensor | None, *,
                 channels_last_input: bool) -> torch.Tensor:
    """uint8 CPU pixels -> jittered, normalised (B, 3, H, W) float32, contiguous.

    pixels: (B, H, W, 3) when `channels_last_input`, else (B, 3, H, W); any strides.
    factors: (B, 3) brightness, contrast, saturation (1 = unchanged); None = no jitter.
    """
    if not AVAILABLE:
        raise RuntimeError("fused_finish needs numba")
    if pixels.dtype != torch.uint8 or pixels.device.type != "cpu":
        raise ValueError(f"fused_finish needs uint8 CPU pixels, got {pixels.dtype} on {pixels.device}")
    # (B, 3, H, W) planes, contiguous: a uint8 copy when the input is interleaved or strided
    planes = (pixels.permute(0, 3, 1, 2) if channels_last_input else pixels).contiguous()
    b, c, h, w = planes.shape
    if c != 3:
        raise ValueError(f"fused_finish needs 3 channels, got {c}")
    if factors is None:
        f = np.ones((b, 3), dtype=np.float32)
    else:
        f = factors.detach().cpu().numpy() if isinstance(factors, torch.Tensor) else np.asarray(factors)
        f = np.ascontiguousarray(f, dtype=np.float32).reshape(b, 3)
    out = torch.empty((b, 3, h, w), dtype=torch.float32)
    if b:
        _compiled(planes.view(b, 3, h * w).numpy(), f, _MEAN, _INV_STD, out.view(b, 3, h * w).numpy())
    return out
