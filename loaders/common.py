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
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from cornpipe.choices import DEFAULT_OVERSAMPLE_BY, oversample_keys
from cornpipe.errors import LoaderError
from cornpipe.loaders.base import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_OVERSAMPLE,
    HOST_DTYPE,
    MIN_IMAGE_SIZE,
    AugmentConfig,
    Batch,
    Normalization,
    to_device,
)
from cornpipe.loaders.pixels.params import AugParams, sample_params, val_params
from cornpipe.loaders.sampling import check_strategy, epoch_indices, num_batches, rank_length

# Sub-streams of the per-(seed, epoch, ...) random generators, so that augmentation draws never
# reuse the numbers of the epoch draw (which is seeded by [seed, epoch] alone).
AUGMENT_STREAM = 0xA06  # "aug"


@dataclass(frozen=True)
class LoaderSpec:
    """A loader request: the one object every backend's `build(shards, spec)` receives.

    `make_loader(shards, split, backend, **fields)` takes these fields as keywords; `resolved()` fills in
    every default for this machine and checks the values (a one-line LoaderError when wrong). A
    resolved spec has a torch.device, a dtype, an int `workers`, a bool `shuffle` and `channels_last`,
    and `augment` as an AugmentConfig (train) or None (the deterministic validation transform).
    """

    split: str = "train"
    batch_size: int = 64
    image_size: int = DEFAULT_IMAGE_SIZE  # px, output images are (image_size, image_size)
    device: str | torch.device = "cpu"
    oversample: str = DEFAULT_OVERSAMPLE  # none | balanced | sqrt | joint (cornpipe.loaders.sampling)
    # the keys whose cells the draw balances: position, plus grade, stage, source or metadata columns
    # (cornpipe.loaders.cells); a comma-separated string is taken too
    oversample_by: tuple[str, ...] | str = DEFAULT_OVERSAMPLE_BY
    seed: int = 0
    # worker processes (torch/ffcv/dali), or decode and CPU crop threads (resident); None: cores, max 8
    workers: int | None = None
    rank: int = 0
    world_size: int = 1
    # None: AugmentConfig() for "train" (and a folder's "all"), the validation transform otherwise;
    # False: the validation transform everywhere; True or an AugmentConfig: those parameters
    augment: AugmentConfig | bool | None = None
    val_crop_fraction: float | None = None  # validation resize/centre crop; None: the AugmentConfig's
    drop_last: bool = False
    # None: float16 on CUDA, float32 on CPU; torch.uint8 (base.HOST_DTYPE, CPU only): host-only batches,
    # (B, S, S, 3) uint8 crops without colour jitter and normalisation (the GPU's job)
    dtype: torch.dtype | None = None
    shuffle: bool | None = None  # None: shuffle where augmentation is on by default
    channels_last: bool | None = None  # NHWC batches; None: on CUDA only (the trainer passes its choice)
    # mean/std (0-255) of the last step: the trunk's own (base.IMAGENET for cornpipe's trunks). Required:
    # a forgotten one is an error, never ImageNet's statistics by default
    normalization: Normalization = field(kw_only=True)
    num_samples: int | None = None  # global epoch length (all ranks); None = rows in the split
    even: bool = False  # truncate the global epoch to a multiple of world_size (DDP)
    # read exactly these samples (manifest ids, in this order), each from whichever split holds it: folds of
    # cross-validation without re-converting. `split` then only names the role (train: augmented). None: the split
    sample_ids: tuple[int, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # backend-specific extras

    @property
    def on_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    @property
    def host_only(self) -> bool:
        """Whether batches are host-only uint8 crops (dtype torch.uint8), not normalised images."""
        return self.dtype == HOST_DTYPE

    def resolved(self) -> LoaderSpec:
        """This request with every default filled in for this machine; LoaderError for a bad value."""
        dev = resolve_device(self.device)
        check_strategy(self.oversample)
        try:
            oversample_by = oversample_keys(self.oversample_by)
        except ValueError as exc:
            raise LoaderError(str(exc)) from None
        if self.batch_size < 1:
            raise LoaderError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise LoaderError(f"image_size must be >= {MIN_IMAGE_SIZE} px, got {self.image_size}")
        if not isinstance(self.normalization, Normalization):
            raise LoaderError(f"normalization must be a loaders.base.Normalization (the trunk's mean and std), "
                              f"got {self.normalization!r}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise LoaderError(f"rank {self.rank} is not in 0..world_size-1 (world_size={self.world_size})")
        if self.workers is not None and self.workers < 0:
            raise LoaderError(f"workers must be >= 0, got {self.workers}")
        train = self.split in ("train", "all")  # "all": every image of an original folder (loaders.backends.folder)
        augment = self.augment
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
        dtype = self.dtype
        if dtype is None:
            dtype = torch.float16 if dev.type == "cuda" else torch.float32
        if dtype == HOST_DTYPE:
            if dev.type != "cpu":
                raise LoaderError(f"dtype {dtype} (host-only uint8 batches) stays on the CPU; got device {dev}")
        elif not dtype.is_floating_point:
            raise LoaderError(f"dtype must be a floating point type or torch.uint8 (host-only), got {dtype}")
        crop = self.val_crop_fraction
        if crop is None:
            crop = (augment if isinstance(augment, AugmentConfig) else AugmentConfig()).val_crop_fraction
        return LoaderSpec(
            split=self.split, batch_size=int(self.batch_size), image_size=int(self.image_size), device=dev,
            oversample=self.oversample, oversample_by=oversample_by, seed=int(self.seed),
            workers=default_workers() if self.workers is None else int(self.workers),
            rank=int(self.rank), world_size=int(self.world_size), augment=config, val_crop_fraction=float(crop),
            drop_last=bool(self.drop_last), dtype=dtype,
            shuffle=train if self.shuffle is None else bool(self.shuffle),
            channels_last=dev.type == "cuda" if self.channels_last is None else bool(self.channels_last),
            normalization=self.normalization,
            num_samples=None if self.num_samples is None else int(self.num_samples), even=bool(self.even),
            sample_ids=None if self.sample_ids is None else tuple(int(i) for i in self.sample_ids),
            options=dict(self.options or {}),
        )


SPEC_FIELDS: frozenset[str] = frozenset(f.name for f in fields(LoaderSpec))


def make_spec(split: str | LoaderSpec, **overrides: Any) -> LoaderSpec:
    """A resolved LoaderSpec from a split name (or a spec) and LoaderSpec field keywords."""
    unknown = sorted(set(overrides) - SPEC_FIELDS)
    if unknown:
        raise LoaderError(f"unknown loader option(s) {', '.join(unknown)}; valid: {', '.join(sorted(SPEC_FIELDS))}")
    if isinstance(split, LoaderSpec):
        return replace(split, **overrides).resolved()
    if "normalization" not in overrides:
        raise LoaderError("a loader needs normalization=: the trunk's mean and std (loaders.base.Normalization; "
                          "IMAGENET for cornpipe's own trunks), never a default")
    return LoaderSpec(split=split, **overrides).resolved()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Loader worker processes when the caller does not say: the usable cores, at most 8."""
    return max(1, min(8, usable_cores()))


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


def source_rows(shards: Any, spec: LoaderSpec) -> tuple[list[tuple[str, int]], np.ndarray, np.ndarray, np.ndarray]:
    """Where each of the loader's rows lives ((split, row) in the shard set) and its labels (position,
    grade, sample_id): the split's rows, or `spec.sample_ids` from whichever split holds each."""
    if spec.sample_ids is None:
        position, grade, sample_id = shards.labels(spec.split)
        return [(spec.split, r) for r in range(len(position))], position, grade, sample_id
    by_id = {int(s["id"]): s for s in shards.manifest["samples"]}
    missing = [i for i in spec.sample_ids if i not in by_id]
    if missing:
        raise LoaderError(f"sample id(s) {', '.join(map(str, missing[:5]))} are not in {shards.root}")
    chosen = [by_id[i] for i in spec.sample_ids]
    return ([(s["split"], int(s["row"])) for s in chosen],
            np.array([s["position"] for s in chosen], dtype=np.int64),
            np.array([s["grade"] for s in chosen], dtype=np.float32),
            np.array([s["id"] for s in chosen], dtype=np.int64))


def row_cells(shards: Any, spec: LoaderSpec, locations: list[tuple[str, int]], grade: np.ndarray) -> np.ndarray | None:
    """The oversampling cells (int64 codes, loaders.cells) of the rows at `locations` for
    `spec.oversample_by`; None when the draw balances position alone or draws nothing (`none`)."""
    from cornpipe.loaders.cells import cell_codes, check_keys

    if spec.oversample == "none" or tuple(spec.oversample_by) == ("position",):
        return None
    check_keys(spec.oversample_by, shards.manifest["samples"])
    return cell_codes(spec.oversample_by, [shards.samples(split)[row] for split, row in locations], grade)


def epoch_rows(spec: LoaderSpec, position: np.ndarray, grade: np.ndarray, epoch: int,
               cells: np.ndarray | None = None) -> np.ndarray:
    """This rank's rows of `epoch` (int64), the oversampling draw of every backend; `cells`: row_cells'."""
    return epoch_indices(
        len(position), position=position, grade=grade, strategy=spec.oversample, shuffle=spec.shuffle,
        seed=spec.seed, epoch=epoch, rank=spec.rank, world_size=spec.world_size,
        num_samples=spec.num_samples, even=spec.even, cells=cells,
    )


def cut_to_batches(rows: np.ndarray, spec: LoaderSpec) -> np.ndarray:
    """`rows` without the last, partial batch when `spec.drop_last` (the one drop_last rule)."""
    return rows[:len(rows) - len(rows) % spec.batch_size] if spec.drop_last else rows


def augment_params(spec: LoaderSpec, sizes: np.ndarray, epoch: int, slot: int) -> AugParams:
    """The augmentation of images of `sizes` ((B, 2) stored height, width) drawn for `slot` (a batch
    index, or a sample index for per-sample backends) of `epoch`: a pure function of (seed, epoch,
    rank, slot), so no backend's draw depends on its workers or threads. Validation: the fixed transform."""
    if spec.augment is None:
        return val_params(sizes, spec.val_crop_fraction)
    rng = np.random.default_rng([spec.seed, epoch, spec.rank, slot, AUGMENT_STREAM])
    return sample_params(rng, sizes, spec.augment)


class EpochLoader:
    """Epoch bookkeeping shared by the backends; subclasses implement `__iter__` and `close`.

    `position`, `grade`, `sample_id` are the split's labels in row order (numpy arrays); `cells` the rows'
    oversampling cells (row_cells), None: position alone.
    """

    def __init__(self, spec: LoaderSpec, position: np.ndarray, grade: np.ndarray,
                 sample_id: np.ndarray, cells: np.ndarray | None = None) -> None:
        self.spec = spec
        self.position = np.asarray(position, dtype=np.int64)
        self.grade = np.asarray(grade, dtype=np.float32)
        self.sample_id = np.asarray(sample_id, dtype=np.int64)
        if not len(self.position) == len(self.grade) == len(self.sample_id):
            raise LoaderError("position, grade and sample_id label counts differ")
        self.cells = cells
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
        return epoch_rows(self.spec, self.position, self.grade, self.epoch if epoch is None else epoch, self.cells)

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
        rows = cut_to_batches(self.indices(epoch), self.spec)
        bs = self.spec.batch_size
        for start in range(0, len(rows), bs):
            yield rows[start:start + bs]

    def labels_for(self, rows: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(position int64, grade float32, sample_id int64) of `rows`, each (B,) on the device."""
        r = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        dev = self.spec.device  # pinned, non-blocking copies on CUDA (loaders.base.to_device)
        return to_device(self.position[r], dev), to_device(self.grade[r], dev), to_device(self.sample_id[r], dev)

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError

    def close(self) -> None:
        """Release worker processes, file handles and device memory; idempotent."""

    def __enter__(self) -> EpochLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
