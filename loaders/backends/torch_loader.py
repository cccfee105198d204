"""`torch` backend: a torch DataLoader with PIL decode over the tar shards (folders: loaders.backends.folder).

This is the baseline every speed claim is a ratio to, and (over the original image folders) what
the team trained with before: PIL decodes and augments each image in a worker process.

- Workers read samples by random access (`ShardSet.read_image_bytes`: one pread at the .idx offset);
  each worker opens its own ShardSet, so no file handle is shared across processes.
- The sampler yields (epoch, slot, row) for this rank's `epoch_indices`; the augmentation draw of a
  sample is seeded by (seed, epoch, rank, slot), so results do not depend on the number of workers.
- Workers return uint8 (S, S, 3), as PIL holds it, after the geometric augmentation plus the sample's
  colour-jitter factors; the main process moves the uint8 batch to the device (pinned, non_blocking on
  CUDA) and jitters + normalises it there, in one batched op (on the CPU the fused pass of
  `loaders.pixels.finish_cpu`, which reads interleaved pixels). Host-only (dtype uint8): the collated
  (B, S, S, 3) uint8 batch is the output.
- A worker that hits a bad sample returns its one-line message instead of raising, so the user sees
  a one-line LoaderError naming the file (torch re-raises worker errors with a multi-line message).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from cornpipe.errors import LoaderError
from cornpipe.loaders.base import Batch
from cornpipe.loaders.common import EpochLoader, LoaderSpec, augment_params, row_cells, source_rows
from cornpipe.loaders.pixels.augment import apply_geometry_pil
from cornpipe.loaders.pixels.finish import finish_batch, one_cpu_thread


class _Failure(str):
    """A worker's one-line error message, carried through collate to the main process."""


class ImageDataset(Dataset):
    """Decodes and augments one sample; subclasses say where its bytes come from."""

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec  # resolved: augmentation, image size, seed and rank of the draw

    def open(self, row: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, key: tuple[int, int, int]) -> tuple:
        epoch, slot, row = key
        try:
            image = self.open(row)
        except LoaderError as exc:
            return _Failure(str(exc)), None, row
        params = augment_params(self.spec, np.array([[image.height, image.width]]), epoch, slot)
        crop = apply_geometry_pil(image, params, self.spec.image_size)
        # (S, S, 3) uint8, as PIL holds the crop: a host-only batch as it is, and what the fused CPU
        # finish reads (from a planar batch it would first copy to NHWC: one more pass)
        pixels = torch.from_numpy(np.array(crop.convert("RGB"), dtype=np.uint8))
        return pixels, torch.from_numpy(params.jitter[0]), row


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB") if image.mode != "RGB" else image


class ShardImages(ImageDataset):
    """Samples of a shard set by loader row: `locations[row]` is its (split, row) in the set."""

    def __init__(self, root: Path, locations: list[tuple[str, int]], spec: LoaderSpec) -> None:
        super().__init__(spec)
        self.root = Path(root)
        self.locations = locations  # loaders.common.source_rows: one split's rows, or any sample ids
        self._shards = None  # opened lazily, once per process

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_shards"] = None
        return state

    def open(self, row: int) -> Image.Image:
        from cornpipe.shards.shard_set import ShardSet

        if self._shards is None:
            self._shards = ShardSet(self.root)
        split, row = self.locations[row]
        data = self._shards.read_image_bytes(split, row)
        try:
            return _decode(data)
        except Exception as exc:  # PIL raises many types for broken data
            raise LoaderError(
                f"corrupt image in {shard_of(self._shards, split, row)} "
                f"({split} row {row}): {type(exc).__name__}: {exc}".replace("\n", " ")
            ) from exc


def shard_of(shards, split: str, row: int) -> Path:
    """The tar file that holds `row` of `split` (for error messages)."""
    return shards.locate(split, row)[0]


class _EpochSampler(Sampler):
    """Yields (epoch, slot, row) for the owning loader's current epoch."""

    def __init__(self, loader: TorchLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch = self.loader.epoch
        for slot, row in enumerate(self.loader.indices(epoch).tolist()):
            yield epoch, slot, row

    def __len__(self) -> int:
        return self.loader.num_samples


def _collate(items: list[tuple]) -> tuple:
    for pixels, _jitter, _row in items:
        if isinstance(pixels, _Failure):
            return pixels, None, None
    pixels, jitter, rows = zip(*items, strict=True)
    return torch.stack(pixels), torch.stack(jitter), torch.tensor(rows, dtype=torch.int64)


class TorchLoader(EpochLoader):
    """DataLoader over `dataset` with the shared epoch draw; yields `Batch`es on the device."""

    def __init__(self, dataset: ImageDataset, spec: LoaderSpec, position: np.ndarray, grade: np.ndarray,
                 sample_id: np.ndarray, cells: np.ndarray | None = None) -> None:
        super().__init__(spec, position, grade, sample_id, cells)
        workers = spec.workers
        extra = {}
        if workers > 0:
            extra = {"persistent_workers": True,
                     "prefetch_factor": int(spec.options.get("prefetch_factor", 2))}
        self._loader = DataLoader(
            dataset, batch_size=spec.batch_size, sampler=_EpochSampler(self), drop_last=spec.drop_last,
            num_workers=workers, collate_fn=_collate, pin_memory=spec.on_cuda, **extra,
        )

    def __iter__(self) -> Iterator[Batch]:
        spec = self.spec
        for pixels, jitter, rows in self._loader:
            if isinstance(pixels, _Failure):
                self.close()
                raise LoaderError(str(pixels))
            if spec.host_only:  # (B, S, S, 3) uint8, collated on the host: the GPU's jitter + normalise are left
                yield Batch(pixels, *self.labels_for(rows))
                continue
            # With decoding in worker processes, torch's OpenMP threads here only fight the workers
            # for the cores (much slower batches on 2 cores, docs/loaders.md): one thread on CPU.
            with one_cpu_thread(not spec.on_cuda and self._loader.num_workers > 0):
                x = pixels.to(spec.device, non_blocking=spec.on_cuda)  # (B, S, S, 3) uint8
                images = finish_batch(x, jitter if spec.augment is not None else None, dtype=spec.dtype, hwc=True,
                                      channels_last=spec.channels_last, norm=spec.normalization)
            yield Batch(images, *self.labels_for(rows))

    def close(self) -> None:
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None


def build(shards, spec: LoaderSpec) -> TorchLoader:
    """The torch backend over a ShardSet's tar shards."""
    locations, position, grade, sample_id = source_rows(shards, spec)
    for split in sorted({s for s, _ in locations} | ({spec.split} if spec.sample_ids is None else set())):
        for tar, idx in shards.shards(split):
            for path in (tar, idx):
                if not Path(path).is_file():
                    raise LoaderError(f"missing shard file {path}")
    dataset = ShardImages(shards.root, locations, spec)
    return TorchLoader(dataset, spec, position, grade, sample_id, row_cells(shards, spec, locations, grade))
