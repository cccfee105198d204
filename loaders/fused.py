"""Colour jitter + normalisation of a uint8 batch on the CPU in one fused numba pass.

The same definition as the tensor path (`loaders.augment.color_jitter_batch` then
`normalize_batch`): brightness, contrast (blend with the mean grey of the brightened image),
saturation (blend with each pixel's grey), each step clamped to [0, 255] as torchvision does, then
(x - MEAN_255) / STD_255. The tensor path makes ~10 float passes over the batch; on a CPU that was
the loaders' serial bottleneck (1-2 ms per 224 px image on the main thread, 40-60 % of an `ffcv`
epoch on 2 cores). Here each image is read as uint8 (twice when contrast is on: once for the
contrast centre) and written once as float32, in loops that vectorise, images in parallel:
~0.07 ms per 224 px image on one core against ~1 ms for the tensor ops.

numba ships with FFCV; without it (the bare GPU machine, where batches are finished on the GPU
anyway) `AVAILABLE` is False and callers use the tensor path. An installed numba that fails to import
(built for another NumPy, a broken llvmlite) makes `ready()` False with one RuntimeWarning, and callers
use the tensor path too: a slower epoch, not a crashed run. The kernel releases the GIL and
runs images in parallel on numba's threads when numba's threading layer is thread-safe (tbb, omp).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings

import numpy as np
import torch

from cornpipe.loaders.base import IMAGENET, Normalization

GREY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)  # ITU-R 601 luma

# numba is imported (~1 s) and the kernel compiled (or loaded from its cache) on the first call, not
# when `loaders.augment` is imported by every command.
AVAILABLE = importlib.util.find_spec("numba") is not None


def _thread_safe_layer() -> bool:
    """Whether numba will pick a thread-safe threading layer (tbb or omp). The `workqueue`
    fallback aborts when two threads run parallel kernels at once -- FFCV's epoch thread does --
    so without tbb/omp the kernel runs serially."""
    for layer in ("tbbpool", "omppool"):
        try:
            importlib.import_module(f"numba.np.ufunc.{layer}")
            return True
        except ImportError:  # the library behind it (libtbb, libgomp) is missing
            continue
    return False


_SUM_BLOCK = 4096  # pixels summed in float32 before adding to the float64 total


def _finish_kernel(px, factors, flips, width, mean, inv_std, out):  # pragma: no cover - compiled by numba
    """px (B, 3, H*W) uint8 planes, factors (B, 3) float32 -> out (B, 3, H*W) float32, each image
    flipped first by flips (B, 2) uint8 (horizontal, vertical; rows of `width` pixels).

    Every pixel loop reads unit-stride planes and writes one array, so it vectorises (fastmath:
    the inputs are uint8, there are no NaNs or infinities for it to mishandle); a flip writes the
    rows backwards / in reverse order, with unsigned indices (a signed one makes numba check for
    wrap-around, which stops the loop vectorising). Brightness and contrast are cheap enough to
    recompute per channel rather than store.
    """
    wr, wg, wb = np.float32(GREY_WEIGHTS[0]), np.float32(GREY_WEIGHTS[1]), np.float32(GREY_WEIGHTS[2])
    zero, top, one = np.float32(0.0), np.float32(255.0), np.float32(1.0)
    n, hw = px.shape[0], px.shape[2]
    for i in prange(n):
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
        # saturation blends each channel with the pixel's grey (of the brightness+contrast image)
        keep = one - sf
        grey = np.empty(hw, dtype=np.float32)
        for p in range(hw):
            r = min(max(min(max(np.float32(pr[p]) * bf, zero), top) * cf + shift, zero), top)
            g = min(max(min(max(np.float32(pg[p]) * bf, zero), top) * cf + shift, zero), top)
            b = min(max(min(max(np.float32(pb[p]) * bf, zero), top) * cf + shift, zero), top)
            grey[p] = (wr * r + wg * g + wb * b) * keep
        hflip, vflip = flips[i, 0] != 0, flips[i, 1] != 0
        rows = hw // width if width > 0 else 0
        w, last = np.uint64(width), np.uint64(width - 1)
        for c in range(3):
            plane, dst, m, s = px[i, c], out[i, c], mean[c], inv_std[c]
            for y in range(rows):
                src_row, src_grey = plane[y * width:(y + 1) * width], grey[y * width:(y + 1) * width]
                to = (rows - 1 - y) if vflip else y
                dst_row = dst[to * width:(to + 1) * width]
                if hflip:
                    for q in range(np.uint64(0), w):
                        x = min(max(min(max(np.float32(src_row[q]) * bf, zero), top) * cf + shift, zero), top)
                        dst_row[last - q] = (min(max(x * sf + src_grey[q], zero), top) - m) * s
                else:
                    for q in range(np.uint64(0), w):
                        x = min(max(min(max(np.float32(src_row[q]) * bf, zero), top) * cf + shift, zero), top)
                        dst_row[q] = (min(max(x * sf + src_grey[q], zero), top) - m) * s


prange = range  # numba.prange inside the compiled kernel (see _compiled)


@functools.cache
def _compiled():  # noqa: ANN202 - a numba dispatcher, or None where numba does not import
    try:
        import numba
    except Exception as exc:  # ImportError, or whatever a half-installed numba raises on import
        # functools.cache: one warning per process, however many batches ask.
        warnings.warn(f"numba is installed but does not import ({type(exc).__name__}: {exc}); CPU batches "
                      f"are finished with the slower tensor ops", RuntimeWarning, stacklevel=3)
        return None
    global prange
    prange = numba.prange  # the kernel's global, read when numba compiles it
    return numba.njit(nogil=True, cache=True, fastmath=True, error_model="numpy",
                      parallel=_thread_safe_layer())(_finish_kernel)




def ready() -> bool:
    """Whether the fused kernel runs here: numba installed and importable (imported on the first call)."""
    return AVAILABLE and _compiled() is not None


def fused_finish(pixels: torch.Tensor, factors: np.ndarray | torch.Tensor | None, *,
                 channels_last_input: bool, norm: Normalization = IMAGENET,
                 flips: tuple[np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
    """uint8 CPU pixels -> (flipped,) jittered, normalised (B, 3, H, W) float32, contiguous.

    pixels: (B, H, W, 3) when `channels_last_input`, else (B, 3, H, W); any strides.
    factors: (B, 3) brightness, contrast, saturation (1 = unchanged); None = no jitter.
    flips: per-image horizontal and vertical flip flags, applied first (as `augment.flip_rot_batch`
    does, in the same pass instead of two uint8 copies); None = none.
    """
    if not ready():
        raise RuntimeError("fused_finish needs numba (not installed, or it does not import)")
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
    flags = np.zeros((b, 2), dtype=np.uint8)
    if flips is not None:
        flags[:, 0], flags[:, 1] = np.asarray(flips[0]).reshape(b) != 0, np.asarray(flips[1]).reshape(b) != 0
    out = torch.empty((b, 3, h, w), dtype=torch.float32)
    if b:
        mean = np.asarray(norm.mean, dtype=np.float32)
        inv_std = (1.0 / np.asarray(norm.std, dtype=np.float64)).astype(np.float32)
        _compiled()(planes.view(b, 3, h * w).numpy(), f, flags, w, mean, inv_std, out.view(b, 3, h * w).numpy())
    return out
