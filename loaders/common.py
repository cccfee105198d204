"""What every backend shares: the resolved loader request and the epoch bookkeeping.

`make_loader` turns its keyword arguments into one `LoaderSpec` (defaults resolved, values checked)
and hands it to a backend module's `build(shards, spec)`. Backends subclass `EpochLoader`, which
owns the epoch rule, the per-rank index draw and the batch count, so those cannot drift apart.

Epoch rule: the epoch advances only through `set_epoch(e)` (like DistributedSampler). Iterating
twice without it replays the same epoch: same rows, same order, same augmentation draws.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from loaders.base import AugmentConfig, Batch, LoaderError
from loaders.sampling import check_strategy, epoch_indices, num_batches, rank_length

# Sub-streams of the per-(seed, epoch, ...) random generators, so that augmentation draws never
# reuse the numbers of the epoch draw (which is seeded by [seed, epoch] alone).
AUGMENT_STREAM = 0xA06  # "aug"


@dataclass(frozen=True)
class LoaderSpec:
    """A loader request with every default resolved; what each backend's `build` receives."""

    split: str
    batch_size: int = 64
    image_size: int = 224  # px, output images are (image_size, image_size)
    device: torch.device = torch.device("cpu")
    oversample: str = "none"
    seed: int = 0
    workers: int = 0  # worker processes (torch/ffcv/dali) or decode threads (resident)
    rank: int = 0
    world_size: int = 1
    augment: AugmentConfig | None = None  # None: the deterministic validation transform
    val_crop_fraction: float = 0.875  # used when augment is None
    drop_last: bool = False
    dtype: torch.dtype = torch.float32
    shuffle: bool = True
    num_samples: int | None = None  # global epoch length (all ranks); None = rows in the split
    even: bool = False  # truncate the global epoch to a multiple of world_size (DDP)
    options: Mapping[str, Any] = field(default_factory=dict)  # backend-specific extras

    @property
    def channels_last(self) -> bool:
        return self.device.type == "cuda"

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


def default_workers() -> int:
    """Loader worker processes when the caller does not say: the usable cores, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise LoaderError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoaderError(f"device {device!r} asked for but CUDA is not available here")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise LoaderError(f"device {device!r} is not supported (use cpu, cuda or cuda:N)")
    return dev


def make_spec(
    split: str,
    *,
    batch_size: int = 64,
    image_size: int = 224,
    device: str | torch.device = "cpu",
    oversample: str = "none",
    seed: int = 0,
    workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    augment: AugmentConfig | bool | None = None,
    drop_last: bool = False,
    dtype: torch.dtype | None = None,
    shuffle: bool | None = None,
    num_samples: int | None = None,
    even: bool = False,
    options: Mapping[str, Any] | None = None,
) -> LoaderSpec:
    """Resolve make_loader's defaults and check its values (one-line LoaderError when wrong)."""
    dev = resolve_device(device)
    check_strategy(oversample)
    if batch_size < 1:
        raise LoaderError(f"batch_size must be >= 1, got {batch_size}")
    if image_size < 8:
        raise LoaderError(f"image_size must be >= 8 px, got {image_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise LoaderError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")
    if workers is not None and workers < 0:
        raise LoaderError(f"workers must be >= 0, got {workers}")
    train = split in ("train", "all")  # "all": every image of an original folder (loaders.folder)
    if augment is None:
        config = AugmentConfig() if train else None
    elif augment is False:
        config = None
    elif augment is True:
        config = AugmentConfig()
    elif isinstance(augment, AugmentConfig):
        config = augment
    else:
        raise LoaderError(f"augment must be an AugmentConfig, True, False or None, got {augment!r}")
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if not dtype.is_floating_point:
        raise LoaderError(f"dtype must be a floating point type, got {dtype}")
    crop = (config or AugmentConfig()).val_crop_fraction
    return LoaderSpec(
        split=split, batch_size=int(batch_size), image_size=int(image_size), device=dev,
        oversample=oversample, seed=int(seed),
        workers=default_workers() if workers is None else int(workers),
        rank=int(rank), world_size=int(world_size), augment=config, val_crop_fraction=crop,
        drop_last=bool(drop_last), dtype=dtype, shuffle=train if shuffle is None else bool(shuffle),
        num_samples=None if num_samples is None else int(num_samples), even=bool(even),
        options=dict(options or {}),
    )


class EpochLoader:
    """Epoch bookkeeping shared by the backends; subclasses implement `__iter__` and `close`.

    `position`, `grade`, `sample_id` are the split's labels in row order (numpy arrays).
    """

    def __init__(self, spec: LoaderSpec, position: np.ndarray, grade: np.ndarray,
                 sample_id: np.ndarray) -> None:
        self.spec = spec
        self.position = np.asarray(position, dtype=np.int64)
        self.grade = np.asarray(grade, dtype=np.float32)
        self.sample_id = np.asarray(sample_id, dtype=np.int64)
        if not len(self.position) == len(self.grade) == len(self.sample_id):
            raise LoaderError("position, grade and sample_id label counts differ")
        self.epoch = 0

    @property
    def rows(self) -> int:
        """Samples in the split (before oversampling and sharding)."""
        return len(self.position)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next pass draws (rows, order and augmentation)."""
        self.epoch = int(epoch)

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's rows for `epoch` (default: the current one), int64[num_samples]."""
        s = self.spec
        return epoch_indices(
            self.rows, position=self.position, grade=self.grade, strategy=s.oversample,
            shuffle=s.shuffle, seed=s.seed, epoch=self.epoch if epoch is None else epoch,
            rank=s.rank, world_size=s.world_size, num_samples=s.num_samples, even=s.even,
        )

    @property
    def num_samples(self) -> int:
        """Samples this rank reads per epoch (including the last, partial batch unless drop_last)."""
        s = self.spec
        total = self.rows if s.num_samples is None else s.num_samples
        return rank_length(total, s.rank, s.world_size, s.even)

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.spec.batch_size, self.spec.drop_last)

    def batch_rows(self, epoch: int | None = None) -> Iterator[np.ndarray]:
        """This rank's rows for `epoch`, cut into batches (honouring drop_last)."""
        rows = self.indices(epoch)
        bs = self.spec.batch_size
        stop = len(rows) - len(rows) % bs if self.spec.drop_last else len(rows)
        for start in range(0, stop, bs):
            yield rows[start:start + bs]

    def labels_for(self, rows: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(position int64, grade float32, sample_id int64) of `rows`, each (B,) on the device."""
        r = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        dev = self.spec.device
        nb = dev.type == "cuda"
        return (torch.from_numpy(self.position[r]).to(dev, non_blocking=nb),
                torch.from_numpy(self.grade[r]).to(dev, non_blocking=nb),
                torch.from_numpy(self.sample_id[r]).to(dev, non_blocking=nb))

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError

    def close(self) -> None:
        """Release worker processes, file handles and device memory; idempotent."""

    def __enter__(self) -> EpochLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
