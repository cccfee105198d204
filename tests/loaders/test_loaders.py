"""Every loader backend honours one contract: labels stay with their images, epochs and ranks draw
the rows `loaders.sampling` says, batches have the agreed layout, and bad shards fail in one line.

The data set is made for this: each image is one solid colour that encodes its source file, so a
batch image can be checked against its own position, grade and sample id after shuffling,
oversampling and geometric augmentation (colour jitter off there: it would change the colour).
"""

from __future__ import annotations

import csv
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FORMATS, needs_library
from PIL import Image

from cornpipe.errors import LoaderError, MissingDependency
from cornpipe.loaders import BACKEND_MODULES, make_loader
from cornpipe.loaders.base import IMAGENET, MEAN_255, STD_255, AugmentConfig
from cornpipe.loaders.pixels.finish import value_range
from cornpipe.loaders.sampling import epoch_indices
from cornpipe.shards.shard_set import ShardSet, parse_dali_index

# Every make_loader backend, in one place: each cross-backend test below runs over all of them.
LOADER_BACKENDS: tuple[str, ...] = ("torch", "resident", "ffcv", "dali")
TAR_READERS = ("torch", "resident", "dali")  # backends that read the tar shards (ffcv reads the .beton)


N_IMAGES = 200
GRADES = (0, 3, 5, 7, 9)
SIZES = ((24, 32), (32, 24), (28, 28), (20, 36))  # (h, w): mixed shapes exercise crops and padding
IMAGE_SIZE = 16
TOLERANCE = 12.0  # per pixel, 0..255: JPEG + bilinear on a flat colour stay far below this
GEOMETRY_ONLY = AugmentConfig(rot90=True, brightness=0.0, contrast=0.0, saturation=0.0)


def colour_labels(i: int) -> tuple[tuple[int, int, int], int, int]:
    """Image i: (RGB colour, position, grade). Positions are 60 % / 30 % / 10 %."""
    position = 0 if i % 10 < 6 else (1 if i % 10 < 9 else 2)
    g = i % 5
    return (40 + 80 * position, 30 + 45 * g, 20 + 30 * (i % 8)), position, GRADES[g]


def origin_of(i: int) -> str:
    """Image i's `origin` metadata column: blocks of ten field photos, 10 % of the set, every position."""
    return "field" if (i // 10) % 10 == 0 else "lab"


def write_colour_survey(folder: Path, n: int = N_IMAGES) -> Path:
    """n flat-colour PNGs and a manifest CSV (path, position, grade, origin); returns the CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour, position, grade = colour_labels(i)
        h, w = SIZES[i % len(SIZES)]
        pixels = np.full((h, w, 3), colour, np.uint8)
        pixels[0, :10, 0] += np.array([(i >> k) & 1 for k in range(10)], np.uint8)  # unique bytes: convert drops duplicates
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
        rows.append((f"{i:04d}.png", position, grade, origin_of(i)))
    csv_path = folder / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([("path", "position", "grade", "origin"), *rows])
    return csv_path


@pytest.fixture(scope="module")
def colour_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_colour_survey(tmp_path_factory.mktemp("colour") / "src")


def _convert(csv_path: Path, out: Path, mode: str) -> Path:
    from cornpipe.shards.convert import convert_dataset

    convert_dataset(None, out, manifest_csv=csv_path, write_mode=mode, workers=1, seed=0, formats=FORMATS)
    return out


@pytest.fixture(scope="module")
def colour_jpg(colour_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _convert(colour_csv, tmp_path_factory.mktemp("colour_jpg") / "shards", "jpg")


@pytest.fixture(scope="module")
def colour_raw(colour_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _convert(colour_csv, tmp_path_factory.mktemp("colour_raw") / "shards", "raw")


def expected_by_id(root: Path) -> dict[int, tuple[tuple[int, int, int], int, float]]:
    """sample id -> (colour, position, grade) from the manifest's original file names."""
    out = {}
    for s in ShardSet(root).manifest["samples"]:
        colour, position, grade = colour_labels(int(Path(s["path"]).stem))
        assert (s["position"], s["grade"]) == (position, grade)
        out[int(s["id"])] = (colour, position, float(grade))
    return out


def denormalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN_255).view(1, 3, 1, 1)
    std = torch.tensor(STD_255).view(1, 3, 1, 1)
    return images.float().cpu() * std + mean


def run_epoch(loader, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(images, position, grade, sample_id) of one epoch, concatenated, and the batch count."""
    loader.set_epoch(epoch)
    parts = [[], [], [], []]
    batches = 0
    for batch in loader:
        batches += 1
        for part, t in zip(parts, batch, strict=True):
            part.append(t.cpu())
    return (*[torch.cat(p) for p in parts], batches)


def loader_for(root: Path, backend: str, split: str = "train", **kw):
    needs_library(backend)
    kw.setdefault("batch_size", 32)
    kw.setdefault("image_size", IMAGE_SIZE)
    kw.setdefault("workers", 1)
    kw.setdefault("oversample", "none")
    kw.setdefault("normalization", IMAGENET)
    return make_loader(root, split, backend=backend, **kw)


def train_ids(root: Path) -> np.ndarray:
    return ShardSet(root).labels("train")[2]


# ---------------------------------------------------------------------------------------------
# labels stay with their images; the batch contract


def check_batches(loader, expected: dict, device: str = "cpu", dtype: torch.dtype = torch.float32) -> int:
    """Iterate one epoch; every batch honours the contract and every image shows its own colour
    and comes with its own labels. Returns the number of images seen."""
    lo, hi = value_range(IMAGENET)
    seen = 0
    for images, position, grade, sample_id in loader:
        b = len(sample_id)
        seen += b
        assert images.shape == (b, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == dtype
        for t in (images, position, grade, sample_id):
            assert t.device.type == device
        if device == "cuda":
            assert images.is_contiguous(memory_format=torch.channels_last)
        else:
            assert images.is_contiguous()
        assert position.shape == grade.shape == sample_id.shape == (b,)
        assert (position.dtype, grade.dtype, sample_id.dtype) == (torch.int64, torch.float32, torch.int64)
        assert lo - 1e-2 <= images.min().item() and images.max().item() <= hi + 1e-2
        pixels = denormalise(images)
        for k, sid in enumerate(sample_id.tolist()):
            colour, pos, grd = expected[sid]
            assert (position[k].item(), grade[k].item()) == (pos, grd), f"labels of sample {sid}"
            error = (pixels[k] - torch.tensor(colour, dtype=torch.float32).view(3, 1, 1)).abs().max()
            assert error < TOLERANCE, f"sample {sid}: image is not its own (max error {error:.1f})"
    return seen


@pytest.mark.parametrize("mode", ["jpg", "raw"])
@pytest.mark.parametrize("backend", LOADER_BACKENDS)
def test_labels_stay_with_their_images(backend, mode, request):
    root = request.getfixturevalue(f"colour_{mode}")
    loader = loader_for(root, backend, oversample="balanced", augment=GEOMETRY_ONLY, seed=5)
    try:
        assert check_batches(loader, expected_by_id(root)) == loader.num_samples
    finally:
        loader.close()


def test_resident_cuda_crop_path_keeps_labels_on_cpu(colour_jpg):
    """The gather + roi_align path the resident backend takes on CUDA, run on CPU tensors; it reads
    one pixel past each box edge, so this also checks the padding never shows."""
    loader = loader_for(colour_jpg, "resident", oversample="balanced", augment=GEOMETRY_ONLY, seed=5,
                        options={"crop_kernel": "roi_align"})
    try:
        assert check_batches(loader, expected_by_id(colour_jpg)) == loader.num_samples
    finally:
        loader.close()


# ---------------------------------------------------------------------------------------------
# epochs: each sample once, reproducible, different next epoch; oversampling; ranks


@pytest.mark.parametrize("backend", LOADER_BACKENDS)
def test_none_reads_each_sample_once_and_replays_the_epoch(backend, colour_jpg):
    ids = train_ids(colour_jpg)
    loader = loader_for(colour_jpg, backend, batch_size=24)
    try:
        assert loader.num_samples == len(ids) and len(loader) == -(-len(ids) // 24)
        *_, first, batches = run_epoch(loader, 0)
        assert batches == len(loader)
        assert sorted(first.tolist()) == sorted(ids.tolist())  # drop_last off: every id exactly once
        *_, again, _ = run_epoch(loader, 0)
        assert torch.equal(first, again)  # same (seed, epoch) -> same ids in the same order
        *_, second, _ = run_epoch(loader, 1)
        assert sorted(second.tolist()) == sorted(ids.tolist()) and not torch.equal(first, second)
    finally:
        loader.close()
    dropping = loader_for(colour_jpg, backend, batch_size=24, drop_last=True)
    try:
        sizes = [len(b.sample_id) for b in dropping]
        assert sizes == [24] * (len(ids) // 24) == [24] * len(dropping)
    finally:
        dropping.close()


@pytest.mark.parametrize("backend", LOADER_BACKENDS)
def test_balanced_gives_each_position_a_third(backend, colour_jpg):
    position = ShardSet(colour_jpg).labels("train")[0]
    assert np.allclose(np.bincount(position) / len(position), (0.6, 0.3, 0.1), atol=0.02)
    # 1200 draws: one standard deviation of a class share is 0.014, so 0.05 is a real bound.
    loader = loader_for(colour_jpg, backend, oversample="balanced", augment=False, num_samples=1200)
    try:
        _, got, *_ = run_epoch(loader, 0)
    finally:
        loader.close()
    assert len(got) == 1200
    shares = np.bincount(got.numpy(), minlength=3) / len(got)
    assert np.all(np.abs(shares - 1 / 3) <= 0.05), shares


@pytest.mark.parametrize("backend", LOADER_BACKENDS)
def test_every_backend_draws_the_shared_position_by_origin_cells(backend, colour_jpg):
    """--oversample-by position,origin: each backend reads the rows loaders.sampling draws over the cells,
    so the field photos (10 % of the set) fill about half the epoch."""
    from cornpipe.loaders.cells import cell_codes

    shards = ShardSet(colour_jpg)
    position, grade, ids = shards.labels("train")
    origin = np.array([s["meta"]["origin"] for s in shards.samples("train")])
    loader = loader_for(colour_jpg, backend, oversample="balanced", oversample_by="position,origin", augment=False,
                        num_samples=600, seed=9)
    try:
        *_, got, _ = run_epoch(loader, 2)
    finally:
        loader.close()
    cells = cell_codes(("position", "origin"), shards.samples("train"), grade)
    rows = epoch_indices(len(ids), position=position, grade=grade, strategy="balanced", seed=9, epoch=2,
                         num_samples=600, cells=cells)
    assert got.tolist() == ids[rows].tolist()
    present = set(zip(position.tolist(), origin.tolist(), strict=True))
    field_cells = sum(o == "field" for _, o in present)
    # 600 draws: one standard deviation of a half share is 0.02
    assert abs(np.mean(origin[rows] == "field") - field_cells / len(present)) < 0.08


def test_the_folder_backend_draws_the_same_cells(colour_csv):
    from cornpipe.loaders.cells import cell_codes

    loader = make_loader(None, "all", backend="torch-folder", batch_size=50, image_size=IMAGE_SIZE, workers=0,
                         augment=False, options={"manifest_csv": colour_csv}, normalization=IMAGENET,
                         oversample="sqrt", oversample_by="position,origin", seed=1)
    try:
        _, position, grade, sample_id, _ = run_epoch(loader, 0)
    finally:
        loader.close()
    # discovery order = file name order here, so sample id i is image i
    labels = [colour_labels(i) for i in range(N_IMAGES)]
    grades = np.array([g for _, _, g in labels], dtype=np.float32)
    cells = cell_codes(("position", "origin"), [{"meta": {"origin": origin_of(i)}} for i in range(N_IMAGES)], grades)
    rows = epoch_indices(N_IMAGES, position=np.array([p for _, p, _ in labels]), grade=grades, strategy="sqrt",
                         seed=1, epoch=0, cells=cells)
    assert sample_id.tolist() == rows.tolist()


@pytest.mark.parametrize("backend", LOADER_BACKENDS)
def test_two_ranks_read_disjoint_halves_of_the_epoch(backend, colour_jpg):
    ids = train_ids(colour_jpg)
    got = []
    for rank in (0, 1):
        loader = loader_for(colour_jpg, backend, rank=rank, world_size=2, seed=3)
        try:
            *_, sid, _ = run_epoch(loader, 2)
            assert len(sid) == loader.num_samples
        finally:
            loader.close()
        got.append(sid.tolist())
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == sorted(ids.tolist())
    # and exactly the draw loaders.sampling defines for each rank
    for rank in (0, 1):
        rows = epoch_indices(len(ids), strategy="none", seed=3, epoch=2, rank=rank, world_size=2)
        assert got[rank] == ids[rows].tolist()


@pytest.mark.parametrize("backend", LOADER_BACKENDS)
def test_validation_is_row_order_and_deterministic(backend, colour_jpg):
    val_ids = ShardSet(colour_jpg).labels("val")[2]
    loader = loader_for(colour_jpg, backend, split="val", batch_size=16)
    try:
        first, *_, sid, _ = run_epoch(loader, 0)
        again, *_ = run_epoch(loader, 1)
    finally:
        loader.close()
    assert sid.tolist() == val_ids.tolist()
    assert torch.equal(first, again)


@pytest.mark.parametrize("backend", ["torch", "resident"])
def test_augmentation_replays_with_the_epoch(backend, colour_jpg):
    """Augmentation draws are seeded by (seed, epoch, ...): a rerun sees the same pixels."""
    aug = AugmentConfig(rot90=True)
    loader = loader_for(colour_jpg, backend, augment=aug, oversample="sqrt", workers=2)
    try:
        a, *_ = run_epoch(loader, 4)
        b, *_ = run_epoch(loader, 4)
        c, *_ = run_epoch(loader, 5)
    finally:
        loader.close()
    assert torch.equal(a, b) and not torch.equal(a, c)
    if backend == "torch":  # and the draws do not depend on the number of worker processes
        single = loader_for(colour_jpg, backend, augment=aug, oversample="sqrt", workers=0)
        d, *_ = run_epoch(single, 4)
        assert torch.equal(a, d)


# ---------------------------------------------------------------------------------------------
# bad input: one-line errors naming the file


def _copy(root: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "shards"
    shutil.copytree(root, dest)
    return dest


def _shard_file(root: Path, backend: str) -> Path:
    needs_library(backend)
    shards = ShardSet(root)
    return shards.beton_path("train") if backend == "ffcv" else shards.shards("train")[0][0]


def _expect_one_line_error(root: Path, backend: str, names: Path) -> None:
    with pytest.raises(LoaderError) as info:
        loader = loader_for(root, backend, workers=1)
        try:
            for _ in loader:
                pass
        finally:
            loader.close()
    message = str(info.value)
    assert "\n" not in message and names.name in message, message


@pytest.mark.parametrize("backend", LOADER_BACKENDS)
def test_missing_shard_names_the_file(backend, colour_jpg, tmp_path):
    root = _copy(colour_jpg, tmp_path)
    target = _shard_file(root, backend)
    target.unlink()
    _expect_one_line_error(root, backend, target)


@pytest.mark.parametrize("backend", LOADER_BACKENDS)
def test_truncated_shard_names_the_file(backend, colour_jpg, tmp_path):
    root = _copy(colour_jpg, tmp_path)
    target = _shard_file(root, backend)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    _expect_one_line_error(root, backend, target)


@pytest.mark.parametrize("backend", TAR_READERS)
def test_corrupt_image_in_a_shard_names_the_file(backend, colour_jpg, tmp_path):
    root = _copy(colour_jpg, tmp_path)
    tar, idx = ShardSet(root).shards("train")[0]
    offset, size = parse_dali_index(idx)[3]["jpg"]
    with open(tar, "r+b") as f:  # same length, not a JPEG any more
        f.seek(offset)
        f.write(b"this is not a jpeg".ljust(size, b"!"))
    _expect_one_line_error(root, backend, tar)


def test_unknown_names_list_the_valid_ones(colour_jpg):
    with pytest.raises(LoaderError, match="unknown backend 'pil'; valid: ffcv, dali, torch, resident"):
        make_loader(colour_jpg, "train", backend="pil", normalization=IMAGENET, oversample="none")
    with pytest.raises(LoaderError, match="valid: none, balanced, sqrt, joint"):
        make_loader(colour_jpg, "train", backend="torch", oversample="rare", normalization=IMAGENET)
    with pytest.raises(LoaderError, match="unknown split 'test'"):
        make_loader(colour_jpg, "test", backend="torch", normalization=IMAGENET, oversample="none")


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_missing_library_names_the_extra_to_install(backend, colour_jpg, monkeypatch):
    module, package = {"ffcv": ("ffcv", re.escape("pip install 'cornpipe[ffcv]'")),
                       "dali": ("nvidia", re.escape("pip install 'cornpipe[dali]'"))}[backend]
    for name in list(sys.modules):
        if name == module or name.startswith(module + ".") or name == BACKEND_MODULES[backend]:
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # `import ffcv` now fails as if not installed
    with pytest.raises(MissingDependency, match=package):
        loader = make_loader(colour_jpg, "train", backend=backend, batch_size=8, image_size=IMAGE_SIZE,
                             workers=1, normalization=IMAGENET, oversample="none")
        loader.close()


def test_resident_refuses_a_split_over_its_memory_cap(colour_jpg):
    with pytest.raises(LoaderError, match=r"resident backend needs .* may use"):
        make_loader(colour_jpg, "train", backend="resident", options={"max_bytes": 10_000}, normalization=IMAGENET, oversample="none")


# ---------------------------------------------------------------------------------------------
# the "before" baseline: the torch backend over the original images


def test_folder_loader_keeps_labels_and_reads_each_image_once(colour_csv):
    loader = make_loader(None, "all", backend="torch-folder", batch_size=32, image_size=IMAGE_SIZE,
                         workers=1, augment=GEOMETRY_ONLY, options={"manifest_csv": colour_csv}, normalization=IMAGENET, oversample="none")
    try:
        # discovery order = file name order here, so sample id i is image i
        expected = {i: (c, p, float(g)) for i in range(N_IMAGES) for c, p, g in [colour_labels(i)]}
        assert check_batches(loader, expected) == N_IMAGES
        *_, sample_id, _ = run_epoch(loader, 1)
    finally:
        loader.close()
    assert sorted(sample_id.tolist()) == list(range(N_IMAGES))


def test_folder_split_matches_the_converted_split(synth_raw, tiny_shards):
    from cornpipe.loaders.backends.folder import make_folder_loader

    shards = ShardSet(tiny_shards)
    for split in ("train", "val"):
        loader = make_folder_loader(synth_raw, split, batch_size=64, image_size=IMAGE_SIZE, workers=0, seed=7,
                                    augment=False, normalization=IMAGENET, oversample="none")
        _, position, grade, _, _ = run_epoch(loader, 0)
        want_pos, want_grade, _ = shards.labels(split)
        assert sorted(zip(position.tolist(), grade.tolist(), strict=True)) == \
            sorted(zip(want_pos.tolist(), want_grade.tolist(), strict=True))


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", LOADER_BACKENDS)
def test_cuda_batches_are_fp16_channels_last_on_the_gpu(backend, colour_jpg):
    loader = loader_for(colour_jpg, backend, device="cuda", oversample="balanced", augment=GEOMETRY_ONLY)
    try:
        seen = check_batches(loader, expected_by_id(colour_jpg), device="cuda", dtype=torch.float16)
        assert seen == loader.num_samples
    finally:
        loader.close()
