"""`make_loader`: one entry point, four backends (plus the original-folder baseline), one batch contract.

    from cornpipe.loaders import make_loader
    from cornpipe.loaders.base import IMAGENET
    loader = make_loader("shards/", "train", backend="resident", batch_size=64, image_size=224,
                         device="cuda", oversample="balanced", normalization=IMAGENET)
    for epoch in range(epochs):
        loader.set_epoch(epoch)          # the epoch advances only here (see loaders.common)
        for images, position, grade, sample_id in loader:   # loaders.base.Batch
            ...

Backends live in their own modules (loaders.backends) and are imported only when asked for, so a missing FFCV or
DALI breaks only that backend (MissingDependency naming the extra to install). Each backend module
provides `build(shards: ShardSet, spec: LoaderSpec) -> EpochLoader subclass`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from cornpipe.errors import LoaderError, MissingDependency, install_hint
from cornpipe.loaders.base import BACKEND_MODULES, BACKENDS, FOLDER_BACKEND
from cornpipe.loaders.common import EpochLoader, LoaderSpec, make_spec

LIBRARY_EXTRAS: dict[str, str] = {"ffcv": "ffcv", "nvidia": "dali"}  # missing top-level module -> extra
ALL_BACKENDS: tuple[str, ...] = (*BACKENDS, FOLDER_BACKEND)

__all__ = ["ALL_BACKENDS", "FOLDER_BACKEND", "EpochLoader", "LoaderSpec", "backend_module", "make_loader"]


def backend_module(backend: str):
    """Import the module of `backend`; LoaderError for an unknown name, MissingDependency (naming the
    extra to install) for a backend whose library is not installed."""
    if backend not in BACKEND_MODULES:
        raise LoaderError(f"unknown backend {backend!r}; valid: {', '.join(ALL_BACKENDS)}")
    name = BACKEND_MODULES[backend]
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing in LIBRARY_EXTRAS:
            raise MissingDependency(
                f"backend {backend!r} needs {missing}, which is not installed: "
                f"{install_hint(LIBRARY_EXTRAS[missing])}"
            ) from exc
        if exc.name == name:
            raise LoaderError(f"backend {backend!r} is not part of this install ({name} is missing)") from exc
        raise


def make_loader(shards: Any, split: str | LoaderSpec = "train", backend: str = "torch",
                **fields: Any) -> EpochLoader:
    """A loader over `shards` (a ShardSet or its folder) yielding `cornpipe.loaders.base.Batch`es.

    `split` is a split name or a whole `LoaderSpec`; `fields` are LoaderSpec fields, each documented
    there: normalization (required with a split name: the trunk's mean and std), batch_size,
    image_size, device, oversample, oversample_by, seed, workers, rank, world_size, augment, drop_last, dtype,
    shuffle, channels_last, num_samples, even, options. One request object
    goes to the backend; nothing is re-listed on the way.

    Backend "torch-folder": `shards` is the ORIGINAL image folder (see loaders.backends.folder), split "all",
    "train" or "val"; options manifest_csv, grade_scale, val_fraction, split_seed.
    """
    spec = make_spec(split, **fields)
    if backend == FOLDER_BACKEND:
        from cornpipe.loaders.backends.folder import build_folder

        return build_folder(shards, spec)
    module = backend_module(backend)
    from cornpipe.shards.shard_set import ShardSet

    shard_set = shards if isinstance(shards, ShardSet) else ShardSet(Path(shards))
    if spec.sample_ids is None and spec.split not in shard_set.splits:
        raise LoaderError(f"unknown split {spec.split!r} (this shard set has: {', '.join(shard_set.splits)})")
    return module.build(shard_set, spec)
