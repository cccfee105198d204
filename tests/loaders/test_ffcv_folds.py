"""The ffcv backend beyond one split: any set of sample ids (a cross-validation fold spans train.beton
and val.beton), read exactly as the shared epoch draw says; and its decoder's normalised output.

- A fold of ids from both splits gives exactly those ids' pictures (the torch backend's, within the
  resize filters' difference) and labels, in the draw's order; each id as often as the draw says,
  under oversampling; rank slices are disjoint and cover the fold; drop_last keeps whole batches;
  the same (seed, epoch) replays the same pixels; FFCV's process cache reads both files too.
- Finishing inside the decoder (CPU, float32: colour jitter and normalisation) gives the pixels of
  the uint8 + loaders.pixels.finish path, NCHW and channels_last, through flips, quarter turns and jitter;
  the batches it hands out, float32 or host-only uint8, stay as they were while later batches are made.
- A bad JPEG in the second file names that file and its split row.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_library

from cornpipe.errors import LoaderError
from cornpipe.loaders import make_loader
from cornpipe.loaders.base import HOST_DTYPE, IMAGENET, AugmentConfig
from cornpipe.shards.shard_set import ShardSet

pytest.importorskip("ffcv")

S = 32  # output image size
NO_JITTER = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0)  # crops and both flips
TURNS = AugmentConfig(rot90=True, brightness=0.0, contrast=0.0, saturation=0.0)
JITTER = AugmentConfig()  # the default: crops, both flips, colour jitter
EVERYTHING = AugmentConfig(rot90=True, brightness=0.4, contrast=0.4, saturation=0.4)  # clamps too


def fold(root: Path, n_val: int = 5, n_train: int = 9) -> list[int]:
    """Ids from both splits, interleaved, in no split's row order."""
    samples = ShardSet(root).manifest["samples"]
    val = [s["id"] for s in samples if s["split"] == "val"][:n_val]
    train = [s["id"] for s in samples if s["split"] == "train"][::-1][:n_train]
    ids = [i for pair in zip(train, val, strict=False) for i in pair] + train[len(val):]
    assert len(ids) == n_val + n_train
    return ids


def loader(root: Path, backend: str = "ffcv", **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("image_size", S)
    kw.setdefault("workers", 1)
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", torch.float32)
    kw.setdefault("oversample", "none")
    kw.setdefault("normalization", IMAGENET)
    return make_loader(root, kw.pop("split", "train"), backend=backend, **kw)


def epoch(lo, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, position, grade, sample_id) of epoch e, concatenated (the loader is closed after)."""
    try:
        lo.set_epoch(e)
        parts = list(zip(*[tuple(batch) for batch in lo], strict=True))
    finally:
        lo.close()
    return tuple(torch.cat(p) for p in parts)


def test_a_fold_from_both_splits_gives_those_ids_pictures_and_labels(tiny_shards: Path) -> None:
    ids = fold(tiny_shards)
    kw = dict(split="val", sample_ids=ids, oversample="none", shuffle=False)
    images, position, grade, sample_id = epoch(loader(tiny_shards, **kw), 0)
    assert sample_id.tolist() == ids  # in the order asked, from both .beton files
    labels = {s["id"]: (s["position"], float(s["grade"])) for s in ShardSet(tiny_shards).manifest["samples"]}
    assert [labels[i] for i in ids] == list(zip(position.tolist(), grade.tolist(), strict=True))
    needs_library("torch")
    reference, *_, ref_ids = epoch(loader(tiny_shards, "torch", **kw), 0)
    assert ref_ids.tolist() == ids
    diff = (images - reference).abs().mean(dim=(1, 2, 3))
    assert diff.max() < 0.05, diff  # resize filters differ (~0.003); another image differs by ~0.5


@pytest.mark.parametrize("oversample", ["balanced", "joint"])
def test_a_fold_is_read_as_often_as_the_shared_draw_says(oversample: str, tiny_shards: Path) -> None:
    """The draw runs over the fold's rows, as on the torch backend: the same ids, same order, same counts."""
    ids = fold(tiny_shards)
    kw = dict(sample_ids=ids, oversample=oversample, seed=7, num_samples=40, augment=NO_JITTER)
    lo = loader(tiny_shards, **kw)
    rows = lo.indices(3)
    *_, got = epoch(lo, 3)
    assert got.tolist() == np.asarray(ids)[rows].tolist()
    *_, ref = epoch(loader(tiny_shards, "torch", **kw), 3)
    assert Counter(got.tolist()) == Counter(ref.tolist()) and got.tolist() == ref.tolist()


def test_a_fold_through_ffcvs_process_cache_gives_the_same_batches(tiny_shards: Path) -> None:
    """FFCV's process cache loads each file's pages for that file's rows of each batch."""
    kw = dict(sample_ids=fold(tiny_shards), augment=NO_JITTER, oversample="balanced", seed=2, workers=2)
    a, *_, ids = epoch(loader(tiny_shards, **kw), 1)
    b, *_, ids_b = epoch(loader(tiny_shards, **kw, options={"os_cache": False}), 1)
    assert torch.equal(ids, ids_b) and torch.equal(a, b)


def test_rank_slices_of_a_fold_are_disjoint_and_cover_it(tiny_shards: Path) -> None:
    ids = fold(tiny_shards)
    seen = []
    for rank in range(3):
        lo = loader(tiny_shards, sample_ids=ids, rank=rank, world_size=3, augment=False, batch_size=3)
        n = lo.num_samples
        *_, got = epoch(lo, 2)
        assert len(got) == n
        seen.append(got.tolist())
    flat = [i for part in seen for i in part]
    assert sorted(flat) == sorted(ids) and len(set(flat)) == len(ids)


def test_a_fold_keeps_drop_last_and_replays_its_epoch(tiny_shards: Path) -> None:
    ids = fold(tiny_shards)  # 14 ids, batches of 4: 3 whole ones
    lo = loader(tiny_shards, sample_ids=ids, drop_last=True, augment=NO_JITTER, seed=3)
    try:
        lo.set_epoch(1)
        sizes = [len(b.sample_id) for b in lo]
        assert sizes == [4, 4, 4] == [4] * len(lo)
        a, *_, a_ids = epoch(lo, 1)
    finally:
        lo.close()
    b, *_, b_ids = epoch(loader(tiny_shards, sample_ids=ids, drop_last=True, augment=NO_JITTER, seed=3), 1)
    c, *_ = epoch(loader(tiny_shards, sample_ids=ids, drop_last=True, augment=NO_JITTER, seed=3), 2)
    assert torch.equal(a_ids, b_ids) and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("augment", [False, NO_JITTER, TURNS, JITTER, EVERYTHING],
                         ids=["val", "flips", "turns", "jitter", "everything"])
def test_finishing_in_the_decoder_gives_the_finish_paths_pixels(channels_last, augment, tiny_shards) -> None:
    """The decoder's colour jitter and normalisation are loaders.pixels.finish's; the contrast centre is
    summed in another order (row by row), hence the 1e-4 (a level is ~0.017 once normalised)."""
    kw = dict(sample_ids=fold(tiny_shards), augment=augment, channels_last=channels_last, seed=5, workers=2)
    fused, *_, ids = epoch(loader(tiny_shards, **kw), 4)
    plain, *_, plain_ids = epoch(loader(tiny_shards, **kw, options={"fuse": False}), 4)
    assert torch.equal(ids, plain_ids)
    assert fused.dtype == torch.float32 and fused.shape == plain.shape == (len(ids), 3, S, S)
    assert fused.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-4 if augment and augment.contrast else 1e-5)
    if augment and augment.brightness:  # the jitter was applied: the images differ from unjittered ones
        geometry = AugmentConfig(rot90=augment.rot90, brightness=0.0, contrast=0.0, saturation=0.0)
        bare, *_ = epoch(loader(tiny_shards, **{**kw, "augment": geometry}), 4)
        assert (fused - bare).abs().mean(dim=(1, 2, 3)).min() > 0.01


def test_host_only_batches_are_the_loaders_own(tiny_shards) -> None:
    """Host-only uint8 batches are written straight into arrays of the loader's (no copy out of
    FFCV's buffer): a batch the consumer holds keeps its pixels while later ones are made."""
    kw = dict(augment=TURNS, oversample="balanced", num_samples=60, seed=2, workers=2, dtype=HOST_DTYPE)
    lo = loader(tiny_shards, **kw)
    try:
        held = [(b.images, b.images.clone()) for b in lo]
    finally:
        lo.close()
    reference, *_ = epoch(loader(tiny_shards, **kw, options={"fuse": False}), 0)
    assert all(now.dtype == torch.uint8 and now.shape[1:] == (S, S, 3) for now, _ in held)
    assert all(torch.equal(now, then) for now, then in held)
    assert torch.equal(torch.cat([now for now, _ in held]), reference)


def test_batches_handed_out_stay_as_they_were(tiny_shards: Path) -> None:
    """Normalised batches live in reused arrays: one the consumer still holds is never written again."""
    kw = dict(augment=NO_JITTER, oversample="balanced", num_samples=120, seed=1, workers=2)
    lo = loader(tiny_shards, **kw)
    try:
        held = [(b.images, b.images.clone()) for b in lo]  # every batch kept while 30 are made
        dropped = [b.images.clone() for b in lo]  # each batch dropped at once: arrays are reused
    finally:
        lo.close()
    assert all(torch.equal(now, then) for now, then in held)
    assert torch.equal(torch.cat([now for now, _ in held]), torch.cat(dropped))
    assert len({now.data_ptr() for now, _ in held}) == len(held)


def test_a_bad_jpeg_in_the_second_file_names_it_and_its_row(tiny_shards: Path, tmp_path: Path) -> None:
    from ffcv.reader import Reader

    root = tmp_path / "shards"
    shutil.copytree(tiny_shards, root)
    shards = ShardSet(root)
    path = shards.beton_path("val")
    reader = Reader(str(path))
    image = reader.metadata[f"f{list(reader.field_names).index('image')}"]
    table = reader.alloc_table
    row = 2
    start = int(image["data_ptr"][row])
    size = int(table["size"][np.flatnonzero(table["ptr"] == start)[0]])
    with open(path, "r+b") as f:  # same length, not a JPEG any more
        f.seek(start)
        f.write(b"this is not a jpeg".ljust(size, b"!"))
    bad_id = shards.samples("val")[row]["id"]
    ids = [s["id"] for s in shards.samples("train")[:6]] + [bad_id]
    lo = loader(root, sample_ids=ids, augment=False)
    with pytest.raises(LoaderError, match=rf"{path.name} is damaged: val row {row} holds a JPEG that does not"):
        epoch(lo, 0)
