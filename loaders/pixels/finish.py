"""The finish step: uint8 pixels after the geometry -> colour jitter -> normalisation, as the batch contract's images.

One definition, three forms that tests hold to each other:
- batched tensor ops (`color_jitter_batch`, `normalize_batch`), on CUDA (one kernel per step) and
  wherever numba does not run;
- one fused numba pass over a uint8 CPU batch (`loaders.pixels.finish_cpu`), into reused arrays
  (`loaders.pixels.memory`);
- the per-image numba kernels of `loaders.pixels.pixel_kernels`, run inside the ffcv decoder, as a DALI
  operator, on the resident backend's crop threads, and by the fused pass.
`finish_batch` picks the form; `Finisher` finishes the (B, S, S, 3) uint8 batches the ffcv and dali
libraries hand over. The statistics are the run's (`loaders.base.Normalization`, the trunk's own): a
required argument everywhere, never a default.

Host-only batches (dtype uint8, `loaders.base.HOST_DTYPE`) stop before the finish: `host_batch`, the
(B, S, S, 3) uint8 crops for the GPU to finish. `Finisher` copies them out of the library's buffer
(FFCV reuses its batch buffers, so a handed-out view would change under a trainer still holding it);
a backend whose pixels are already its own tensor passes `owned=True` and the copy is skipped.

On CPU a library's batch is finished with one torch thread: the libraries' own threads keep the cores
busy with the next batches, and torch's OpenMP threads spinning for taken cores slow a batch down.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch

from cornpipe.loaders.base import GREY_WEIGHTS, HOST_DTYPE, Normalization, to_device
from cornpipe.loaders.pixels import finish_cpu
from cornpipe.loaders.pixels.geometry import flip_rot_batch
from cornpipe.loaders.pixels.params import AugParams

_CPU_CHUNK = 4  # images per pass of jitter / normalize on the CPU


@lru_cache(maxsize=64)
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 3, 1, 1) per-channel constants on `device`, built once per run: a fresh host->device copy
    every batch would be a blocking transfer (a device sync) on CUDA."""
    with torch.inference_mode(False):  # usable in training after a first call under inference mode
        return torch.tensor(values, dtype=dtype).view(1, 3, 1, 1).to(device)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) ITU-R 601 luma."""
    return (x * _constant(tuple(GREY_WEIGHTS), x.dtype, x.device)).sum(dim=1, keepdim=True)


def color_jitter_batch(x: torch.Tensor, factors: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation on (B, 3, H, W) float in [0, 255] with (B, 3) factors; in place.

    Pass `factors` as a numpy array or a CPU tensor: only then is it free to tell which steps run.
    """
    # Which steps to run is decided on the host copy: no device sync for a CUDA batch.
    host = factors.detach().cpu().numpy() if isinstance(factors, torch.Tensor) else np.asarray(factors)
    active = (host.reshape(-1, 3) != 1).any(axis=0)
    on_device = isinstance(factors, torch.Tensor) and factors.device == x.device
    f = (factors.to(x.dtype) if on_device else to_device(host, x.device, dtype=x.dtype)).reshape(-1, 3)
    for start in range(0, len(x), _chunk(x)):  # in place on each chunk (views of x)
        end = start + _chunk(x)
        _jitter(x[start:end], f[start:end], active)
    return x


def _chunk(x: torch.Tensor) -> int:
    """Images per pass: a few on the CPU, so that the ~10 passes of jitter/normalize stay in
    cache; the whole batch on CUDA (one kernel per step)."""
    return max(len(x), 1) if x.is_cuda else _CPU_CHUNK


def _jitter(x: torch.Tensor, f: torch.Tensor, active: np.ndarray) -> None:
    if active[0]:
        x.mul_(f[:, 0].view(-1, 1, 1, 1)).clamp_(0, 255)
    if active[1]:  # x = mean + c * (x - mean), mean = the image's mean grey level
        c = f[:, 1].view(-1, 1, 1, 1)
        mean = _grey(x).mean(dim=(-3, -2, -1), keepdim=True)
        x.mul_(c).add_(mean * (1 - c)).clamp_(0, 255)
    if active[2]:  # x = grey + s * (x - grey), per pixel
        s_ = f[:, 2].view(-1, 1, 1, 1)
        grey = _grey(x).mul_(1 - s_)
        x.mul_(s_).add_(grey).clamp_(0, 255)


def normalize_batch(x: torch.Tensor, dtype: torch.dtype = torch.float32,
                    channels_last: bool = False, *, norm: Normalization) -> torch.Tensor:
    """(B, 3, H, W) values in [0, 255] -> (x - norm.mean) / norm.std as `dtype`."""
    mean = _constant(tuple(norm.mean), torch.float32, x.device)
    inv_std = 1.0 / _constant(tuple(norm.std), torch.float32, x.device)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for start in range(0, len(x), _chunk(x)):
        end = start + _chunk(x)
        torch.sub(x[start:end].float(), mean, out=out[start:end]).mul_(inv_std)
    out = out.to(dtype)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def host_batch(x: torch.Tensor, hwc: bool = False) -> torch.Tensor:
    """Geometry-augmented pixels in [0, 255] -> a host-only batch: (B, H, W, 3) uint8, contiguous.

    x: (B, 3, H, W), or (B, H, W, 3) with `hwc`; uint8, or float (rounded, clamped). No colour jitter and
    no normalisation: those run where the batch goes (the GPU). A contiguous uint8 NHWC `x` is returned as is.
    """
    if x.dtype != torch.uint8:
        x = x.round().clamp_(0, 255).to(torch.uint8)
    return (x if hwc else x.permute(0, 2, 3, 1)).contiguous()


def uses_finish_cpu(pixels: torch.Tensor, fast: bool | None = None) -> bool:
    """Whether `finish_batch` runs the fused CPU pass, `finish_cpu` (`fast` None: where it can)."""
    if fast is None:
        return pixels.device.type == "cpu" and pixels.dtype == torch.uint8 and finish_cpu.ready()
    return bool(fast)


def finish_batch(pixels: torch.Tensor, factors: np.ndarray | torch.Tensor | None, *,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 hwc: bool = False, fast: bool | None = None, norm: Normalization,
                 flips: tuple[np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
    """uint8 pixels -> (flips,) colour jitter (`factors`, None = none) -> normalised (B, 3, H, W) `dtype`.

    pixels: (B, 3, H, W), or (B, H, W, 3) with `hwc`. On the CPU with numba this is one fused pass
    (`loaders.pixels.finish_cpu`); otherwise (CUDA, or `fast=False`) the tensor ops `color_jitter_batch` and
    `normalize_batch`. Both compute the same thing (tests/loaders/test_augment.py holds them together).
    flips: per-image (horizontal, vertical) flags applied first, as `flip_rot_batch` does; the fused
    pass writes flipped rows instead of flipping uint8 copies (docs/loaders.md).
    dtype HOST_DTYPE (uint8): `host_batch`, the pixels as (B, H, W, 3) uint8, neither jittered nor normalised.
    """
    if flips is not None and (dtype == HOST_DTYPE or not uses_finish_cpu(pixels, fast)):  # flip a uint8 copy first
        n = len(pixels)
        planar = (pixels.permute(0, 3, 1, 2) if hwc else pixels).clone()
        pixels = flip_rot_batch(planar, AugParams(np.zeros((n, 4)), np.asarray(flips[0]), np.asarray(flips[1]),
                                                  np.zeros(n, np.int64), np.ones((n, 3), np.float32)))
        hwc, flips = False, None
    if dtype == HOST_DTYPE:
        return host_batch(pixels, hwc=hwc)
    if uses_finish_cpu(pixels, fast):
        x = finish_cpu.finish_fused(pixels, factors, channels_last_input=hwc, norm=norm, flips=flips,
                                    channels_last=channels_last)
        return x if dtype == torch.float32 else x.to(dtype)  # (.to keeps the memory format)
    x = (pixels.permute(0, 3, 1, 2) if hwc else pixels).float()
    if factors is not None:
        x = color_jitter_batch(x, factors)
    return normalize_batch(x, dtype=dtype, channels_last=channels_last, norm=norm)


def finish_crops(x: torch.Tensor, params: AugParams, *, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, norm: Normalization) -> torch.Tensor:
    """(B, 3, S, S) uint8 CPU crops (`crop_resize_uint8`'s) -> the batch: flips, rot90, jitter and
    normalisation; one fused pass, the flips in it, where there is one and no quarter turn."""
    if params.rot90.any() or dtype == HOST_DTYPE or not uses_finish_cpu(x):  # quarter turns: in uint8 first
        return finish_batch(flip_rot_batch(x, params), params.jitter, dtype=dtype, channels_last=channels_last,
                            norm=norm)
    return finish_batch(x, params.jitter, dtype=dtype, channels_last=channels_last, norm=norm,
                        flips=(params.hflip, params.vflip))


def value_range(norm: Normalization) -> tuple[float, float]:
    """The smallest and largest value a normalised image can hold (for contract checks)."""
    lo = min((0.0 - m) / s for m, s in zip(norm.mean, norm.std, strict=True))
    hi = max((255.0 - m) / s for m, s in zip(norm.mean, norm.std, strict=True))
    return lo, hi


@contextmanager
def one_cpu_thread(active: bool = True) -> Iterator[None]:
    """Run the block with torch's intra-op threads set to 1 (restored after)."""
    threads = torch.get_num_threads()
    if not active or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Finisher:
    """uint8 (B, S, S, 3) on `device` -> normalised (B, 3, S, S) `dtype`, NHWC in memory when
    `channels_last` (the resolved LoaderSpec's choice); dtype uint8 (HOST_DTYPE): the pixels as a
    contiguous (B, S, S, 3) uint8 copy, no jitter or normalisation.

    tensor_ops: finish with batched tensor ops (one kernel per step) rather than the fused CPU pass;
    None = on CUDA only. True on a CPU device runs the CUDA code on CPU tensors (tests/loaders/test_cuda_paths_on_cpu.py).
    owned: the pixels passed in are a tensor nothing else writes to (not a library buffer): host-only
    batches are then handed out without a copy when already contiguous.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, jitter: bool, channels_last: bool,
                 tensor_ops: bool | None = None, *, norm: Normalization, owned: bool = False) -> None:
        self.device, self.dtype, self.jitter, self.channels_last = device, dtype, jitter, channels_last
        self.tensor_ops = device.type == "cuda" if tensor_ops is None else bool(tensor_ops)
        self.norm, self.owned = norm, owned
        self.mean = torch.tensor(norm.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(norm.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor, jitter: np.ndarray | torch.Tensor) -> torch.Tensor:
        if self.dtype == HOST_DTYPE:  # (B, S, S, 3) uint8 crops for a GPU to finish
            out = host_batch(pixels, hwc=True)
            return out.clone() if out.data_ptr() == pixels.data_ptr() and not self.owned else out
        factors = jitter if self.jitter else None
        if not self.tensor_ops:  # one fused numba pass (the tensor ops where numba is missing)
            with one_cpu_thread():
                return finish_batch(pixels, factors, dtype=self.dtype, hwc=True, channels_last=self.channels_last,
                                    norm=self.norm)
        b, h, w, _ = pixels.shape
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        x = torch.empty((b, 3, h, w), dtype=torch.float32, device=self.device, memory_format=layout)
        x.copy_(pixels.permute(0, 3, 1, 2))  # one pass: layout + dtype, off the library's buffer
        if factors is not None:
            color_jitter_batch(x, factors)
        x.sub_(self.mean).div_(self.std)
        return x if self.dtype == torch.float32 else x.to(self.dtype)
