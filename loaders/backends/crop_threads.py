"""Crop-resize and finish of CPU batches from a resident uint8 store, on the resident backend's own threads.

`loaders.pixels.augment.augment_batch` on the CPU runs each crop (torch's uint8 antialias resize) with
torch's intra-op OpenMP threads, then the batch's fused finish on numba's threads. One 224 px crop is
too small to split across cores (one OpenMP thread resizes it as fast as two), and the two pools'
threads, which busy-wait a while for more work after their part, compete for the cores. Here
`threads` Python threads each crop *and* finish whole chunks of the batch, one image after another on
one core (both the resize and the numba kernel release the GIL), with one OpenMP thread and one numba
thread each. Chunks go to whichever thread is free. Host-only batches get their flips and quarter
turns (`pixel_kernels.place`) on the threads too. Before and after: docs/loaders.md.

The batch is the same, value for value, as `augment_batch`'s (tests/loaders/test_crop_threads.py).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from cornpipe.loaders.base import HOST_DTYPE, Normalization
from cornpipe.loaders.pixels import finish_cpu
from cornpipe.loaders.pixels.finish import finish_crops
from cornpipe.loaders.pixels.geometry import crop_into, whole_pixel_boxes
from cornpipe.loaders.pixels.memory import Pools
from cornpipe.loaders.pixels.params import AugParams

CHUNK = 8  # images per task: ~1.2 MB of uint8 crops at 224 px, still in a core's L2 when finished
_SETUP = threading.Lock()  # one pool's threads set up at a time (the process default is lent to them)


def _single_threaded(barrier: threading.Barrier) -> None:
    """Run on each pool thread once: torch and numba on this thread alone."""
    torch.get_num_threads()  # torch sets a thread's OpenMP count at its first parallel op: now, not later
    torch.set_num_threads(1)  # this thread's count (and the process default, which the caller restores)
    finish_cpu.one_thread()
    barrier.wait()  # every task on its own thread: no thread is left unset


class CropThreads:
    """`threads` threads that crop-resize and finish uint8 CPU batches, images split between them."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, int(threads))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cornpipe-crop")
        self._crops = Pools(keep=2, shapes=2)  # uint8 crops of the fused path, never handed out
        with _SETUP:
            default = torch.get_num_threads()
            try:
                barrier = threading.Barrier(self.threads, timeout=60)
                list(self._pool.map(_single_threaded, [barrier] * self.threads))
            finally:
                torch.set_num_threads(default)  # new threads elsewhere start with the process default again

    def augment(self, images: torch.Tensor, params: AugParams, size: int, index: np.ndarray, *,
                dtype: torch.dtype = torch.float32, channels_last: bool = False,
                norm: Normalization) -> torch.Tensor:
        """`augment.augment_batch(images, params, size, index=index, kernel="interpolate", ...)`, on the
        threads: (N, 3, H, W) uint8 CPU `images` (NHWC in memory is fastest), box i of image index[i]."""
        rows = np.asarray(index).tolist()
        b = len(rows)
        boxes = whole_pixel_boxes(params.boxes, b)
        chunks = [range(s, min(s + CHUNK, b)) for s in range(0, b, CHUNK)]
        if not finish_cpu.ready():  # no numba: the crops here, flips and the rest as tensor ops after
            fresh = np.empty((b, size, size, 3), dtype=np.uint8)
            list(self._pool.map(lambda part: self._crop(images, rows, boxes, fresh, part), chunks))
            x = torch.from_numpy(fresh).permute(0, 3, 1, 2)
            return finish_crops(x, params, dtype=dtype, channels_last=channels_last, norm=norm)
        host = dtype == HOST_DTYPE
        turns = np.ascontiguousarray(params.rot90, dtype=np.int64).reshape(b)
        placed = host or bool(turns.any())  # flips and quarter turns as uint8 first (not in the finish)
        factors, flags = finish_cpu.kernel_inputs(b, params.jitter, (params.hflip, params.vflip))
        crops = self._crops.take((b, size, size, 3), np.uint8)
        if host:  # the batch itself: (B, S, S, 3) uint8, handed out
            geometry = finish_cpu.take_output(b, size, size, True, np.uint8)
        else:
            geometry = self._crops.take((b, size, size, 3), np.uint8) if placed else crops
            out = finish_cpu.take_output(b, size, size, channels_last)
            flags_left = np.zeros_like(flags) if placed else flags  # flips the finish still has to write

        def crop_finish(part: range) -> None:
            self._crop(images, rows, boxes, crops, part)
            s = slice(part.start, part.stop)
            if placed:
                finish_cpu.place_into(crops[s], flags[s], turns[s], geometry[s])
            if not host:
                finish_cpu.finish_into(geometry[s], factors[s], flags_left[s], out[s], norm, channels_last)

        list(self._pool.map(crop_finish, chunks))
        if host:
            return torch.from_numpy(geometry)
        batch = finish_cpu.as_batch(out, channels_last)
        return batch if dtype == torch.float32 else batch.to(dtype)  # (.to keeps the memory format)

    @staticmethod
    def _crop(images: torch.Tensor, rows: list[int], boxes: list[list[int]], crops: np.ndarray, part: range) -> None:
        """Crops `part` of the batch into (B, S, S, 3) `crops`. The tensor view is made here, on the pool
        thread: one made by a caller in torch.inference_mode() (evaluation, predict) would be an inference
        tensor, which a thread outside that mode may not write into."""
        x = torch.from_numpy(crops[part.start:part.stop]).permute(0, 3, 1, 2)
        for i in part:
            crop_into(images, rows[i], boxes[i], x[i - part.start:i - part.start + 1])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
