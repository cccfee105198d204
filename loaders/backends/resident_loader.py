"""`resident` backend: the whole split decoded once into one uint8 tensor on the device.

For datasets that fit in (GPU) memory: no worker processes and no per-epoch decode. Each batch
is a gather from the resident tensor plus batched augmentation with tensor ops on the device
(`loaders.pixels.augment.augment_batch`: roi_align crop-resize, flips, rot90, jitter, normalize).

Storage: images keep their convert resolution and aspect. They are stored top-left in a tensor
of shape (N, 3, H_max, W_max), H_max/W_max the largest height/width in the split, with each image's
(h, w) kept beside it; crops are drawn inside the real (h, w) region, so RandomResizedCrop sees
exactly the image it would see on any other backend. The padding repeats each image's last row
and column once (roi_align's bilinear taps at the border read one pixel past it) and is zero beyond.
Memory: N * 3 * H_max * W_max bytes, e.g. 3000 images at max_resolution 512 with mixed portrait
and landscape orientation = 3000 * 3 * 512 * 512 = 2.2 GiB. `options["budget"]` (a
`resident_budget.MemoryBudget`, one per run, shared by its splits) caps all stores together;
without one the store has a budget of its own. `options["max_bytes"]` caps this store alone.
Over either is a LoaderError before anything is decoded. Decoding happens once, here: nvJPEG batches on CUDA with a
per-image CPU fallback, PIL on threads on the CPU (`loaders.backends.resident_decode`).

Augmentation draws: one generator per batch, seeded by (seed, epoch, rank, batch index).
Crop-resize kernel (`options["crop_kernel"]`): "auto" = roi_align on a gathered batch on CUDA,
torch's uint8 antialias kernel straight from the store on the CPU (much faster per core there), each
image cropped and finished by one of `workers` threads (`loaders.backends.crop_threads`);
"roi_align" forces the CUDA path on the CPU too (tests use it to check that path without a GPU).
Host-only (dtype uint8): the same crops and flips, handed out as (B, S, S, 3) uint8 without the
jitter and normalisation (on the CPU flipped on the crop threads; otherwise `loaders.pixels.finish.host_batch`,
roi_align's float pixels rounded).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from cornpipe.errors import LoaderError
from cornpipe.loaders.backends.crop_threads import CropThreads
from cornpipe.loaders.backends.resident_budget import MemoryBudget
from cornpipe.loaders.backends.resident_decode import batch_decoder, chunks, decode_images, place
from cornpipe.loaders.backends.torch_loader import shard_of
from cornpipe.loaders.base import Batch, to_device
from cornpipe.loaders.common import (
    EpochLoader,
    LoaderSpec,
    augment_params,
    cut_to_batches,
    row_cells,
    source_rows,
)
from cornpipe.loaders.pixels.augment import augment_batch
from cornpipe.loaders.pixels.geometry import CROP_KERNELS, roi_align_window, use_interpolate

_DECODE_CHUNK = 64  # images decoded at a time (one nvJPEG batch on CUDA)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class ResidentLoader(EpochLoader):
    """All images of a split on the device; batches are gathered and augmented there."""

    def __init__(self, shards, spec: LoaderSpec) -> None:
        self.locations, position, grade, sample_id = source_rows(shards, spec)  # (split, row) of each row
        super().__init__(spec, position, grade, sample_id, row_cells(shards, spec, self.locations, grade))
        self._shards = shards
        blobs = [shards.read_image_bytes(split, row) for split, row in self.locations]
        self.sizes = np.array([self._header_size(row, b) for row, b in enumerate(blobs)],
                              dtype=np.int64).reshape(-1, 2)  # (N, 2): height, width
        height, width = (self.sizes.max(axis=0) + 1).tolist() if self.rows else (1, 1)
        need = self.rows * 3 * height * width
        what = f"{self.rows} {spec.split} images padded to {height - 1}x{width - 1}"
        limit = spec.options.get("max_bytes")
        if limit is not None and need > int(limit):
            raise LoaderError(
                f"resident backend needs {_gib(need)} for {what} but may use {_gib(int(limit))} on "
                f"{spec.device}; use backend torch, ffcv or dali, or convert with a smaller --max-resolution"
            )
        budget = spec.options.get("budget") or MemoryBudget(spec.device)
        budget.take(spec.split, need, what)
        self.crop_kernel = str(spec.options.get("crop_kernel", "auto"))
        if self.crop_kernel not in CROP_KERNELS or (self.crop_kernel == "interpolate" and spec.on_cuda):
            raise LoaderError(f"crop_kernel {self.crop_kernel!r} is not available on {spec.device}; "
                              f"valid: auto, roi_align{', interpolate' if not spec.on_cuda else ''}")
        dev = spec.device
        cpu_crops = use_interpolate(torch.empty(0, dtype=torch.uint8, device=dev), self.crop_kernel)
        # CPU: NHWC in memory: torch's uint8 antialias resize works on interleaved pixels, and
        # loaders.pixels.finish_cpu reads them; from NCHW it would convert both ways (docs/loaders.md).
        # Allocated so (not converted after): the store may be half the machine's RAM.
        layout = torch.channels_last if cpu_crops else torch.contiguous_format
        self.store = torch.empty((self.rows, 3, height, width), dtype=torch.uint8, device=dev,
                                 memory_format=layout).zero_()
        self._fill(blobs)
        # CPU: crops and their finish on the loader's own threads (loaders.backends.crop_threads)
        self._crop_threads = CropThreads(spec.workers) if cpu_crops else None
        self.position_t = torch.from_numpy(self.position).to(dev)
        self.grade_t = torch.from_numpy(self.grade).to(dev)
        self.sample_id_t = torch.from_numpy(self.sample_id).to(dev)

    @property
    def nbytes(self) -> int:
        """Bytes held by the resident image tensor."""
        return self.store.numel()

    def _where(self, row: int) -> str:
        split, row = self.locations[row]
        return f"{shard_of(self._shards, split, row)} ({split} row {row})"

    def _header_size(self, row: int, blob: bytes) -> tuple[int, int]:
        try:
            with Image.open(io.BytesIO(blob)) as image:
                return image.height, image.width
        except Exception as exc:  # PIL raises many types for broken data
            raise LoaderError(f"corrupt image in {self._where(row)}: {type(exc).__name__}") from exc

    def _decode(self, row: int, blob: bytes) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(blob)) as image:
                array = np.array(image.convert("RGB"), dtype=np.uint8)
        except Exception as exc:
            raise LoaderError(f"corrupt image in {self._where(row)}: {type(exc).__name__}: {exc}"
                              .replace("\n", " ")) from exc
        return torch.from_numpy(array).permute(2, 0, 1)  # (3, h, w)

    def _fill(self, blobs: list[bytes]) -> None:
        """Decode every image once into self.store: nvJPEG batches on CUDA, PIL on threads (it releases
        the GIL while decoding) for the rest and everywhere else (loaders.backends.resident_decode)."""
        decode_batch = batch_decoder(self.store.device)
        with ThreadPoolExecutor(max_workers=max(1, self.spec.workers)) as pool:
            for rows in chunks(len(blobs), _DECODE_CHUNK):
                images = decode_images(rows, [blobs[r] for r in rows], self.sizes[rows.start:rows.stop],
                                       self._decode, decode_batch, pool.map)
                for row, image in zip(rows, images, strict=True):
                    # a CPU-decoded image crosses to the device here: h * w * 3 bytes, once per image
                    place(self.store[row], image.to(self.store.device))

    def __iter__(self) -> Iterator[Batch]:
        spec = self.spec
        epoch = self.epoch
        rows_all = cut_to_batches(self.indices(epoch), spec)
        rows_dev = to_device(rows_all, spec.device)  # once an epoch, without waiting for the GPU
        bs = spec.batch_size
        for b, start in enumerate(range(0, len(rows_all), bs)):
            rows = rows_all[start:start + bs]
            index = rows_dev[start:start + bs]
            params = augment_params(spec, self.sizes[rows], epoch, b)
            if self._crop_threads is not None:
                # CPU: each box is cropped from the store in place (no gather), images split over threads.
                images = self._crop_threads.augment(self.store, params, spec.image_size, rows, dtype=spec.dtype,
                                                    channels_last=spec.channels_last, norm=spec.normalization)
            else:
                # Gather only the window the batch's bilinear taps read (the row/column above and
                # left of each box included): a smaller float copy for roi_align, the same pixels.
                y0, y1, x0, x1 = roi_align_window(params.boxes, *self.store.shape[2:])
                pixels = self.store[index, :, y0:y1, x0:x1]  # (B, 3, y1 - y0, x1 - x0) uint8
                shifted = replace(params, boxes=params.boxes - np.array([y0, x0, 0, 0], dtype=np.float64))
                images = augment_batch(pixels, shifted, spec.image_size, dtype=spec.dtype,
                                       channels_last=spec.channels_last, norm=spec.normalization, kernel="roi_align")
            yield Batch(images, self.position_t[index], self.grade_t[index], self.sample_id_t[index])

    def close(self) -> None:
        self.store = self.store.new_zeros((0, 3, 1, 1))
        if self._crop_threads is not None:
            self._crop_threads.close()


def build(shards, spec: LoaderSpec) -> ResidentLoader:
    """The resident backend over a ShardSet's tar shards."""
    return ResidentLoader(shards, spec)
