"""The "before" baseline: the torch backend over the original image folders, as the team trained.

No convert step: `loaders.discover` finds the images and labels (the 9 source folders or a
manifest CSV) and a DataLoader worker decodes every file at its full, original resolution with
PIL on every epoch. Same sampler, augmentation and batch contract as the `torch` backend over the
shards, so `bench` can show the cost of the file format alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from loaders.base import AugmentConfig, LoaderError
from loaders.common import LoaderSpec, make_spec
from loaders.torch_loader import ImageDataset, TorchLoader

FOLDER_SPLITS: tuple[str, ...] = ("all", "train", "val")


class FolderImages(ImageDataset):
    """Original image files, decoded at full resolution (EXIF orientation applied, made RGB)."""

    def __init__(self, paths: Sequence[Path | str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.paths = [str(p) for p in paths]

    def open(self, row: int) -> Image.Image:
        from loaders.imageio import ImageRejected, decode_rgb

        path = self.paths[row]
        try:
            with open(path, "rb") as f:
                return decode_rgb(f.read())
        except (OSError, ImageRejected) as exc:
            raise LoaderError(f"cannot read image {path}: {exc}".replace("\n", " ")) from exc


def build_folder(src: Path | str, spec: LoaderSpec, *, manifest_csv: Path | str | None = None,
                 grade_scale: Sequence[float] | None = None, val_fraction: float = 0.2,
                 split_seed: int = 0) -> TorchLoader:
    """The torch backend over the original images under `src` (or listed in `manifest_csv`).

    Sample ids are the discovery order. Split "all" serves every image discovery accepts; "train"
    and "val" serve the split convert makes (`loaders.split.assign_split`) with the same
    `val_fraction` and `split_seed` (convert's --val-fraction and --seed; defaults 0.2 and 0) when
    every image converts.
    """
    from loaders.discover import discover
    from loaders.split import assign_split

    if spec.split not in FOLDER_SPLITS:
        raise LoaderError(f"unknown split {spec.split!r} for an image folder; valid: {', '.join(FOLDER_SPLITS)}")
    found = discover(src, manifest_csv=manifest_csv, grade_scale=grade_scale)
    samples = list(found.samples)
    position = np.array([s.position for s in samples], dtype=np.int64)
    grade = np.array([s.grade for s in samples], dtype=np.float32)
    ids = np.arange(len(samples), dtype=np.int64)
    if spec.split != "all" and samples:
        is_val = assign_split(position, grade, val_fraction, split_seed)
        keep = np.flatnonzero(is_val if spec.split == "val" else ~is_val)
        samples = [samples[i] for i in keep]
        position, grade, ids = position[keep], grade[keep], ids[keep]
    if not samples:
        raise LoaderError(f"no usable images for split {spec.split!r} in {src or manifest_csv}")
    dataset = FolderImages([s.path for s in samples], image_size=spec.image_size, augment=spec.augment,
                           val_crop_fraction=spec.val_crop_fraction, seed=spec.seed, rank=spec.rank)
    return TorchLoader(dataset, spec, position, grade, ids)


def make_folder_loader(
    src: Path | str | None,
    split: str = "all",
    *,
    manifest_csv: Path | str | None = None,
    grade_scale: Sequence[float] | None = None,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    batch_size: int = 64,
    image_size: int = 224,
    device: str = "cpu",
    oversample: str = "none",
    seed: int = 0,
    workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    augment: AugmentConfig | bool | None = None,
    drop_last: bool = False,
    dtype=None,
    shuffle: bool | None = None,
    num_samples: int | None = None,
    even: bool = False,
) -> TorchLoader:
    """A loader over the original image folders with make_loader's contract (see `build_folder`).

    `augment=None` augments "train" and "all" (the team trained on the whole folder). The split is
    independent of the loader's `seed` (see `split_seed`).
    """
    spec = make_spec(split, batch_size=batch_size, image_size=image_size, device=device,
                     oversample=oversample, seed=seed, workers=workers, rank=rank, world_size=world_size,
                     augment=augment, drop_last=drop_last, dtype=dtype, shuffle=shuffle,
                     num_samples=num_samples, even=even)
    return build_folder(src, spec, manifest_csv=manifest_csv, grade_scale=grade_scale,
                        val_fraction=val_fraction, split_seed=split_seed)
