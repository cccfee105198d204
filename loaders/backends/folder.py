"""The "before" baseline: the torch backend over the original image folders, as the team trained.

No convert step: `shards.discover` finds the images and labels (the 9 source folders or a
manifest CSV) and a DataLoader worker decodes every file at its full, original resolution with
PIL on every epoch. Same sampler, augmentation and batch contract as the `torch` backend over the
shards, so `bench` can show the cost of the file format alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cornpipe.errors import LoaderError
from cornpipe.loaders.backends.torch_loader import ImageDataset, TorchLoader
from cornpipe.loaders.cells import cell_codes, check_keys
from cornpipe.loaders.common import LoaderSpec, make_spec

FOLDER_SPLITS: tuple[str, ...] = ("all", "train", "val")
FOLDER_OPTIONS: tuple[str, ...] = ("manifest_csv", "grade_scale", "val_fraction", "split_seed")


class FolderImages(ImageDataset):
    """Original image files, decoded at full resolution (EXIF orientation applied, made RGB)."""

    def __init__(self, paths: Sequence[Path | str], spec: LoaderSpec) -> None:
        super().__init__(spec)
        self.paths = [str(p) for p in paths]

    def open(self, row: int) -> Image.Image:
        from cornpipe.shards.imageio import ImageRejected, decode_rgb

        path = self.paths[row]
        try:
            with open(path, "rb") as f:
                return decode_rgb(f.read())
        except (OSError, ImageRejected) as exc:
            raise LoaderError(f"cannot read image {path}: {exc}".replace("\n", " ")) from exc


def build_folder(src: Path | str | None, spec: LoaderSpec) -> TorchLoader:
    """The torch backend over the original images under `src` (or listed in the CSV of
    `spec.options["manifest_csv"]`).

    Sample ids are the discovery order. Split "all" serves every image discovery accepts; "train"
    and "val" serve the split convert makes (`cornpipe.shards.split.assign_split`) with the same
    `val_fraction` and `split_seed` options (convert's --val-fraction and --seed; defaults 0.2 and 0)
    when every image converts. Option `grade_scale`: the scale the labels are checked against.
    """
    opts = spec.options
    samples, ids = folder_split(src, spec.split, manifest_csv=opts.get("manifest_csv"),
                                grade_scale=opts.get("grade_scale"), val_fraction=opts.get("val_fraction", 0.2),
                                split_seed=opts.get("split_seed", 0))
    position = np.array([s.position for s in samples], dtype=np.int64)
    grade = np.array([s.grade for s in samples], dtype=np.float32)
    cells = None
    if spec.oversample != "none" and tuple(spec.oversample_by) != ("position",):  # as a shard set's (row_cells)
        found = [{"source": s.source, "stage": s.stage, "meta": s.meta} for s in samples]
        check_keys(spec.oversample_by, found)
        cells = cell_codes(spec.oversample_by, found, grade)
    return TorchLoader(FolderImages([s.path for s in samples], spec), spec, position, grade, ids, cells)


def folder_split(src: Path | str | None, split: str, *, manifest_csv: Path | str | None = None,
                 grade_scale: Any = None, val_fraction: float = 0.2, split_seed: int = 0) -> tuple[list, np.ndarray]:
    """(discovered samples, their ids = discovery order) of `split` ("all", or convert's train/val split)
    of the original images under `src` or listed in `manifest_csv`; LoaderError when none is left."""
    from cornpipe.shards.discover import discover
    from cornpipe.shards.split import assign_split

    if split not in FOLDER_SPLITS:
        raise LoaderError(f"unknown split {split!r} for an image folder; valid: {', '.join(FOLDER_SPLITS)}")
    samples = list(discover(src, manifest_csv=manifest_csv, grade_scale=grade_scale).samples)
    ids = np.arange(len(samples), dtype=np.int64)
    if split != "all" and samples:
        is_val = assign_split(np.array([s.position for s in samples], dtype=np.int64),
                              np.array([s.grade for s in samples], dtype=np.float32), val_fraction, split_seed)
        keep = np.flatnonzero(is_val if split == "val" else ~is_val)
        samples, ids = [samples[i] for i in keep], ids[keep]
    if not samples:
        raise LoaderError(f"no usable images for split {split!r} in {src or manifest_csv}")
    return samples, ids


def make_folder_loader(src: Path | str | None, split: str = "all", **fields: Any) -> TorchLoader:
    """A loader over the original image folders with make_loader's contract (see `build_folder`):
    the same as `make_loader(src, split, backend="torch-folder", **fields)`.

    `augment=None` augments "train" and "all" (the team trained on the whole folder). The split is
    independent of the loader's `seed` (see option `split_seed`). Folder options (manifest_csv,
    grade_scale, val_fraction, split_seed) may also be given as keywords.
    """
    options = dict(fields.pop("options", None) or {})
    for key in FOLDER_OPTIONS:
        if key in fields:
            options[key] = fields.pop(key)
    return build_folder(src, make_spec(split, options=options, **fields))
