"""The finish step on the CPU: colour jitter + normalisation of a uint8 batch in one fused numba pass.

The same definition as the tensor path (`loaders.pixels.finish.color_jitter_batch` then
`normalize_batch`): brightness, contrast (blend with the mean grey of the brightened image),
saturation (blend with each pixel's grey), each step clamped to [0, 255] as torchvision does, then
(x - mean) / std with the run's statistics (the `norm` every caller passes). The tensor path makes
~10 float passes over the batch, the loaders' serial bottleneck on a CPU. Here each image is read as
uint8 (twice when contrast is on: once for the contrast centre) and written once as float32, by
`loaders.pixels.pixel_kernels` (the passes the `ffcv` decoder runs), images in parallel. They read
interleaved pixels: (B, H, W, 3), or (B, 3, H, W) NHWC in memory, as the resident backend's crops and
the torch backend's PIL crops come. The outputs are reused arrays (`loaders.pixels.memory`): fresh
memory each batch costs its page faults every batch. Timings: docs/loaders.md.

numba is a base dependency; where it is missing anyway (an install without it) `AVAILABLE` is False
and callers use the tensor path. An installed numba that fails to import
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

from cornpipe.loaders.base import Normalization
from cornpipe.loaders.pixels.memory import Pools

# numba is imported (about a second) and the kernel compiled (or loaded from its cache) on the first call, not
# when `loaders.pixels.finish` is imported by every command.
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


def _finish_kernel(px, factors, flips, mean, inv_std, planar, out):  # pragma: no cover - compiled by numba
    """px (B, H, W, 3) uint8, factors (B, 3) float32, flips (B, 2) uint8 (horizontal, vertical) ->
    out float32, (B, 3, H, W) when `planar`, else (B, H, W, 3): one image per iteration, images in
    parallel, each with `loaders.pixels.pixel_kernels`' passes (inlined here), which the `ffcv` decoder and
    the dali jitter operator run too. An image whose factors are all 1 is only normalised."""
    one = np.float32(1.0)
    for i in prange(px.shape[0]):
        f = factors[i]
        hflip, vflip = flips[i, 0] != 0, flips[i, 1] != 0
        if f[0] == one and f[1] == one and f[2] == one:
            _px.normalise(px[i], out[i], hflip, vflip, mean, inv_std, planar)
        else:
            _px.jitter_normalise(px[i], out[i], hflip, vflip, f, mean, inv_std, planar)


def _place_kernel(px, flips, turns, out):  # pragma: no cover - compiled by numba
    """px (B, S, S, 3) uint8 -> out (B, S, S, 3) uint8: each image flipped (flips (B, 2): horizontal,
    vertical), then turned by turns[i] quarter turns counter-clockwise (`pixel_kernels.place`)."""
    for i in range(px.shape[0]):
        _px.place(px[i], out[i], flips[i, 0] != 0, flips[i, 1] != 0, turns[i])


# The output arrays: reused once the batch made from one is no longer held (loaders.pixels.memory), for the
# few most recent batch shapes (a loader's train and val batches, a last short batch).
_POOLS = Pools(keep=4, shapes=4)

prange = range  # numba.prange inside the compiled kernel (see _compiled)
_px = None  # loaders.pixels.pixel_kernels, imported with numba (see _compiled)


@functools.cache
def _compiled():  # noqa: ANN202 - a numba dispatcher, or None where numba does not import
    try:
        import numba
    except Exception as exc:  # ImportError, or whatever a half-installed numba raises on import
        # functools.cache: one warning per process, however many batches ask.
        warnings.warn(f"numba is installed but does not import ({type(exc).__name__}: {exc}); CPU batches "
                      f"are finished with the slower tensor ops", RuntimeWarning, stacklevel=3)
        return None
    from cornpipe.loaders.pixels import pixel_kernels

    global prange, _px
    prange, _px = numba.prange, pixel_kernels  # the kernel's globals, read when numba compiles it
    return pixel_kernels.fresh_cache(numba.njit(nogil=True, cache=True, fastmath=True, error_model="numpy",
                                                parallel=_thread_safe_layer())(_finish_kernel))


@functools.cache
def _compiled_place():  # noqa: ANN202 - a numba dispatcher, or None where numba does not import
    if _compiled() is None:  # (imports numba and pixel_kernels, once)
        return None
    import numba

    return _px.fresh_cache(numba.njit(nogil=True, cache=True, error_model="numpy")(_place_kernel))


def ready() -> bool:
    """Whether the fused kernel runs here: numba installed and importable (imported on the first call)."""
    return AVAILABLE and _compiled() is not None


def finish_fused(pixels: torch.Tensor, factors: np.ndarray | torch.Tensor | None, *,
                 channels_last_input: bool, norm: Normalization,
                 flips: tuple[np.ndarray, np.ndarray] | None = None, channels_last: bool = False) -> torch.Tensor:
    """uint8 CPU pixels -> (flipped,) jittered, normalised (B, 3, H, W) float32: contiguous, or
    NHWC in memory (torch.channels_last) when `channels_last`, written so by the kernel.

    pixels: (B, H, W, 3) when `channels_last_input`, else (B, 3, H, W); any strides. The kernel reads
    interleaved pixels: a (B, 3, H, W) tensor already NHWC in memory (channels_last) is read in place,
    any other is copied to NHWC first (an extra pass over the batch).
    factors: (B, 3) brightness, contrast, saturation (1 = unchanged); None = no jitter.
    flips: per-image horizontal and vertical flip flags, applied first (as `augment.flip_rot_batch`
    does, in the same pass instead of two uint8 copies); None = none.
    """
    if not ready():
        raise RuntimeError("finish_fused needs numba (not installed, or it does not import)")
    if pixels.dtype != torch.uint8 or pixels.device.type != "cpu":
        raise ValueError(f"finish_fused needs uint8 CPU pixels, got {pixels.dtype} on {pixels.device}")
    hwc = (pixels if channels_last_input else pixels.permute(0, 2, 3, 1)).contiguous()  # (B, H, W, 3)
    b, h, w, c = hwc.shape
    if c != 3:
        raise ValueError(f"finish_fused needs 3 channels, got {c}")
    f, flags = kernel_inputs(b, factors, flips)
    written = take_output(b, h, w, channels_last)
    finish_into(hwc.numpy(), f, flags, written, norm, channels_last)
    return as_batch(written, channels_last)


def kernel_inputs(b: int, factors: np.ndarray | torch.Tensor | None,
                  flips: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's per-image inputs for `b` images: (B, 3) float32 factors (None: all 1) and (B, 2)
    uint8 (horizontal, vertical) flip flags (None: none)."""
    if factors is None:
        f = np.ones((b, 3), dtype=np.float32)
    else:
        f = factors.detach().cpu().numpy() if isinstance(factors, torch.Tensor) else np.asarray(factors)
        f = np.ascontiguousarray(f, dtype=np.float32).reshape(b, 3)
    flags = np.zeros((b, 2), dtype=np.uint8)
    if flips is not None:
        flags[:, 0], flags[:, 1] = np.asarray(flips[0]).reshape(b) != 0, np.asarray(flips[1]).reshape(b) != 0
    return f, flags


def take_output(b: int, h: int, w: int, channels_last: bool, dtype: type = np.float32) -> np.ndarray:
    """An array for a batch: (B, H, W, 3) when `channels_last`, else (B, 3, H, W); reused once no
    batch made from it is alive (`loaders.pixels.memory`), so every value must be written."""
    return _POOLS.take((b, h, w, 3) if channels_last else (b, 3, h, w), dtype)


def finish_into(hwc: np.ndarray, factors: np.ndarray, flags: np.ndarray, out: np.ndarray,
                norm: Normalization, channels_last: bool) -> None:
    """Run the kernel: (B, H, W, 3) uint8 `hwc` -> `out` (`take_output`'s layout, or any slice of
    images of it), with `kernel_inputs`' arrays for the same images. Images run in parallel on the
    calling thread's numba threads (`numba.set_num_threads` is per thread; see `one_thread`)."""
    if len(hwc):
        mean = np.asarray(norm.mean, dtype=np.float32)
        inv_std = (1.0 / np.asarray(norm.std, dtype=np.float64)).astype(np.float32)
        _compiled()(hwc, factors, flags, mean, inv_std, not channels_last, out)


def place_into(hwc: np.ndarray, flags: np.ndarray, turns: np.ndarray, out: np.ndarray) -> None:
    """(B, S, S, 3) uint8 `hwc` -> `out`, the same shape: flipped by `kernel_inputs`' flags, then turned
    by `turns` (B,) int64 quarter turns counter-clockwise; the geometry of a host-only batch, or of one
    with quarter turns before its finish. On the calling thread."""
    if len(hwc):
        _compiled_place()(hwc, flags, turns, out)


def as_batch(out: np.ndarray, channels_last: bool) -> torch.Tensor:
    """`take_output`'s array, written, as the (B, 3, H, W) float32 batch (NHWC in memory when `channels_last`)."""
    batch = torch.from_numpy(out)
    return batch.permute(0, 3, 1, 2) if channels_last else batch


def one_thread() -> None:
    """Make the kernel run on the calling thread alone when called from it (numba's thread count is
    per thread): for threads that each finish their own images. A no-op where the kernel does not run."""
    if ready():
        import numba

        numba.set_num_threads(1)
