"""`make_loader`: one entry point, four backends (plus the original-folder baseline), one batch contract.

    from loaders import make_loader
    loader = make_loader("shards/", "train", backend="resident", batch_size=64, image_size=224,
                         device="cuda", oversample="balanced")
    for epoch in range(epochs):
        loader.set_epoch(epoch)          # the epoch advances only here (see loaders.common)
        for images, position, grade, sample_id in loader:   # loaders.base.Batch
            ...

Backends live in their own modules and are imported only when asked for, so a missing FFCV or
DALI breaks only that backend (MissingDependency naming the pip package). Each backend module
provides `build(shards: ShardSet, spec: LoaderSpec) -> EpochLoader subclass`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loaders.base import BACKENDS, AugmentConfig, LoaderError, MissingDependency
from loaders.common import EpochLoader, LoaderSpec, make_spec

FOLDER_BACKEND = "torch-folder"  # the torch backend over the original images (the "before" baseline)
BACKEND_MODULES: dict[str, str] = {
    "ffcv": "loaders.ffcv_loader",
    "dali": "loaders.dali_loader",
    "torch": "loaders.torch_loader",
    "resident": "loaders.resident_loader",
}
PIP_PACKAGES: dict[str, str] = {"ffcv": "ffcv", "nvidia": "nvidia-dali-cuda120"}
ALL_BACKENDS: tuple[str, ...] = (*BACKENDS, FOLDER_BACKEND)

__all__ = ["ALL_BACKENDS", "FOLDER_BACKEND", "EpochLoader", "LoaderSpec", "backend_module", "make_loader"]


def backend_module(backend: str):
    """Import the module of `backend`; LoaderError for an unknown name, MissingDependency for a
    backend whose library is not installed."""
    if backend not in BACKEND_MODULES:
        raise LoaderError(f"unknown backend {backend!r}; valid: {', '.join(ALL_BACKENDS)}")
    name = BACKEND_MODULES[backend]
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing in PIP_PACKAGES:
            raise MissingDependency(
                f"backend {backend!r} needs {missing}: pip install {PIP_PACKAGES[missing]}"
            ) from exc
        if exc.name == name:
            raise LoaderError(f"backend {backend!r} is not part of this install ({name} is missing)") from exc
        raise


def make_loader(
    shards: Any,
    split: str,
    backend: str = "torch",
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
    *,
    num_samples: int | None = None,
    even: bool = False,
    options: Mapping[str, Any] | None = None,
) -> EpochLoader:
    """A loader over `shards` (a ShardSet or its folder) yielding `loaders.base.Batch`es.

    - `augment`: None = AugmentConfig() for "train" (and a folder's "all") and the deterministic
      validation transform otherwise; False = validation transform everywhere; an AugmentConfig =
      those parameters.
    - `shuffle`: None = True where augment defaults on. `dtype`: None = float16 on CUDA, float32 on CPU.
    - `oversample`: none | balanced | sqrt | joint (loaders.sampling). `num_samples`: the global
      epoch length (default: the split's size); `even=True` gives every rank the same length.
    - `workers`: loader processes (torch, ffcv, dali) or decode threads (resident); None = cores, max 8.
    - `options`: backend extras, e.g. {"max_bytes": ...} (resident), {"prefetch_factor": 2} (torch).
    - backend "torch-folder": `shards` is the ORIGINAL image folder (see loaders.folder), split
      "all", "train" or "val"; options manifest_csv, grade_scale, val_fraction, split_seed.
    """
    spec = make_spec(split, batch_size=batch_size, image_size=image_size, device=device,
                     oversample=oversample, seed=seed, workers=workers, rank=rank, world_size=world_size,
                     augment=augment, drop_last=drop_last, dtype=dtype, shuffle=shuffle,
                     num_samples=num_samples, even=even, options=options)
    if backend == FOLDER_BACKEND:
        from loaders.folder import build_folder

        opts = dict(spec.options)
        return build_folder(shards, spec, manifest_csv=opts.get("manifest_csv"),
                            grade_scale=opts.get("grade_scale"), val_fraction=opts.get("val_fraction", 0.2),
                            split_seed=opts.get("split_seed", 0))
    module = backend_module(backend)
    from loaders.shards import ShardSet

    shard_set = shards if isinstance(shards, ShardSet) else ShardSet(Path(shards))
    if split not in shard_set.splits:
        raise LoaderError(f"unknown split {split!r} (this shard set has: {', '.join(shard_set.splits)})")
    return module.build(shard_set, spec)
