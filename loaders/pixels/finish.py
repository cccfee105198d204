"""The last step of the ffcv and dali backends: a (B, S, S, 3) uint8 batch -> the batch contract's images.

Both libraries hand over HWC uint8 crops (FFCV's decoder buffer, DALI's output); the colour jitter
and the normalisation then run on the device with the definition every backend shares: batched
tensor ops on CUDA, the fused numba pass of `loaders.augment.finish_batch` on the CPU.

Host-only batches (dtype uint8, `loaders.base.HOST_DTYPE`) stop before the jitter: the crops come
back as (B, S, S, 3) uint8 on the CPU, copied out of the library's buffer (FFCV reuses its batch
buffers for later batches, so a handed-out view would change under a trainer that still holds it
while it uploads the batch): one memcpy of B*S*S*3 bytes, ~10 MB for 64 images at 224 px. A backend whose
pixels are already its own tensor passes `owned=True` and the copy is skipped.

On CPU this runs with one torch thread: the libraries' own threads (FFCV's numba threads,
DALI's operator threads and workers) keep the cores busy with the next batches, and torch's
OpenMP threads, spinning for cores that are taken, made a batch 10-20x slower on a 2-core machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from cornpipe.loaders.augment import color_jitter_batch, finish_batch, host_batch
from cornpipe.loaders.base import HOST_DTYPE, IMAGENET, Normalization


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
                 tensor_ops: bool | None = None, norm: Normalization = IMAGENET, owned: bool = False) -> None:
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
