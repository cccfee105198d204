"""What is specific to the ffcv and dali backends (the shared contract is tests/loaders/test_loaders.py).

- Both run the shared epoch draw inside the library (FFCV: a custom traversal order assigned after
  construction, working around ffcv 1.0.2's refusal of `Loader(order=<subclass>)`; DALI: a parallel
  external source), so weighted draws with replacement and rank slices come out exactly as
  `loaders.sampling` says, in order.
- Both apply the shared augmentation draws, so their pixels match the reference backend that uses
  the same seeding (resident's per-batch draw) and replay with the epoch.
- DALI's own webdataset reader path: labels from the tar stay with their images, each sample once
  per epoch, disjoint ranks; oversampling is refused there.
- Abandoned epochs, loaders sharing FFCV's compiled Loader, worker processes and torch's thread
  count are cleaned up.
GPU paths (FFCV ToDevice, DALI mixed decode) are `gpu` tests, skipped without CUDA.
"""

from __future__ import annotations

import csv
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cornpipe.errors import LoaderError
from cornpipe.loaders import make_loader
from cornpipe.loaders.base import IMAGENET, MEAN_255, STD_255, AugmentConfig
from cornpipe.loaders.sampling import epoch_indices
from cornpipe.shards.shard_set import ShardSet

pytest.importorskip("ffcv")
pytest.importorskip("nvidia.dali")

N_IMAGES = 64
SIZES = ((24, 32), (32, 24), (28, 28), (20, 36))  # (h, w)
GRADES = (0, 3, 5, 7, 9)
S = 16  # output image size
ROT_AUG = AugmentConfig(rot90=True)  # everything on: crop, both flips, rot90, jitter
GEOMETRY = AugmentConfig(rot90=True, brightness=0.0, contrast=0.0, saturation=0.0)


def labels_of(i: int) -> tuple[int, int]:
    """Image i: (position, grade); positions 60 % / 30 % / 10 %."""
    return (0 if i % 10 < 6 else (1 if i % 10 < 9 else 2)), GRADES[i % 5]


def ramp_image(i: int, h: int, w: int) -> np.ndarray:
    """R rises left to right, G top to bottom, B encodes the position: any flip, turn or crop shows."""
    position, _ = labels_of(i)
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([20 + 215 * x / (w - 1), 20 + 215 * y / (h - 1), np.full((h, w), 40.0 + 80 * position)], -1)
    pixels[0, 0, 2] += i % 7  # unique bytes: convert drops duplicates
    return pixels.round().astype(np.uint8)


def ramp_set(src: Path, n: int, sizes: tuple[tuple[int, int], ...]) -> Path:
    """Convert (jpg) n ramp pictures of the given (h, w) sizes with labels from `labels_of`."""
    from cornpipe.shards.convert import convert_dataset

    src.mkdir()
    rows = [("path", "position", "grade")]
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        Image.fromarray(ramp_image(i, h, w)).save(src / f"{i:04d}.png")
        rows.append((f"{i:04d}.png", *labels_of(i)))
    with open(src / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = src.parent / "shards"
    convert_dataset(None, out, manifest_csv=src / "labels.csv", write_mode="jpg", workers=1, seed=0)
    return out


@pytest.fixture(scope="module")
def ramps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N_IMAGES small ramp pictures (crops about the output size)."""
    return ramp_set(tmp_path_factory.mktemp("ramps") / "src", N_IMAGES, SIZES)


def epoch(loader, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, position, grade, sample_id) of epoch e, concatenated on the CPU."""
    loader.set_epoch(e)
    parts = list(zip(*[[t.cpu() for t in batch] for batch in loader], strict=True))
    return tuple(torch.cat(p) for p in parts)


def loader(root: Path, backend: str, **kw):
    kw.setdefault("batch_size", 12)
    kw.setdefault("image_size", S)
    kw.setdefault("workers", 1)
    kw.setdefault("oversample", "none")
    kw.setdefault("normalization", IMAGENET)
    return make_loader(root, "train", backend=backend, **kw)


def pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised images back to 0..255."""
    mean = torch.tensor(MEAN_255).view(1, 3, 1, 1)
    std = torch.tensor(STD_255).view(1, 3, 1, 1)
    return images.float().cpu() * std + mean


def paired_epoch(lo, ref, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Epoch e's images from a loader and its reference (both closed after); the same sample ids."""
    try:
        a, *_, ids = epoch(lo, e)
        r, *_, ref_ids = epoch(ref, e)
    finally:
        lo.close()
        ref.close()
    assert torch.equal(ids, ref_ids)
    return a, r


def assert_same_pictures(a: torch.Tensor, r: torch.Tensor) -> None:
    """Different resize filters and JPEG leave a few levels; a flip, turn or other crop moves the
    ramps by tens of levels on most pixels."""
    error = (pixels(a) - pixels(r)).abs().mean(dim=(1, 2, 3))
    assert error.max() < 4.0, error.max()
    wrong = (pixels(a) - pixels(r).flip(-1)).abs().mean(dim=(1, 2, 3))
    assert wrong.mean() > 3 * error.max()


def children() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


# ---------------------------------------------------------------------------------------------
# the epoch draw inside the libraries


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_weighted_rank_slices_come_out_in_the_order_sampling_draws(backend, ramps):
    """`joint` draws with replacement; each rank reads exactly its strided slice, in order."""
    position, grade, ids = ShardSet(ramps).labels("train")
    for rank in (0, 1):
        lo = loader(ramps, backend, oversample="joint", seed=11, rank=rank, world_size=2, num_samples=150,
                    augment=False)
        try:
            _, pos, grd, sid = epoch(lo, 3)
        finally:
            lo.close()
        rows = epoch_indices(len(ids), position=position, grade=grade, strategy="joint", seed=11, epoch=3,
                             rank=rank, world_size=2, num_samples=150)
        assert sid.tolist() == ids[rows].tolist()
        assert pos.tolist() == position[rows].tolist() and grd.tolist() == grade[rows].tolist()


def test_ffcv_uses_a_custom_traversal_order(ramps):
    """The workaround is in place: FFCV's Loader draws its order from our TraversalOrder."""
    from ffcv.traversal_order.base import TraversalOrder

    lo = loader(ramps, "ffcv", oversample="balanced", seed=2, augment=False)
    try:
        lo.set_epoch(5)
        list(lo)
        order = lo._loader.traversal_order
        assert isinstance(order, TraversalOrder) and type(order).__name__ == "EpochOrder"
        assert order.sample_order(5).tolist() == lo.indices(5).tolist()
    finally:
        lo.close()


# ---------------------------------------------------------------------------------------------
# augmentation: the shared draws, the same pixels as the reference backend, replayed per epoch


@pytest.mark.parametrize("backend, reference", [("ffcv", "resident"), ("dali", "resident")])
def test_augmented_pixels_match_the_reference_backend_and_replay(backend, reference, ramps):
    lo = loader(ramps, backend, augment=ROT_AUG, oversample="sqrt", seed=4)
    ref = loader(ramps, reference, augment=ROT_AUG, oversample="sqrt", seed=4)
    try:
        a, _, _, ids = epoch(lo, 2)
        again, *_ = epoch(lo, 2)
        other, *_ = epoch(lo, 3)
        r, _, _, ref_ids = epoch(ref, 2)
    finally:
        lo.close()
        ref.close()
    assert torch.equal(a, again) and not torch.equal(a, other)
    assert torch.equal(ids, ref_ids)
    assert_same_pictures(a, r)


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_validation_images_match_the_torch_backend(backend, ramps):
    a, r = paired_epoch(make_loader(ramps, "val", backend=backend, batch_size=8, image_size=S, workers=1, normalization=IMAGENET, oversample="none"),
                        make_loader(ramps, "val", backend="torch", batch_size=8, image_size=S, workers=1, normalization=IMAGENET, oversample="none"), 0)
    assert (pixels(a) - pixels(r)).abs().mean(dim=(1, 2, 3)).max() < 4.0


def test_ffcv_decodes_large_crops_at_a_reduced_scale_with_the_same_pixels(tmp_path):
    """Crops >= 2x the output are decoded at 1/2, 1/4 or 1/8 scale (libjpeg-turbo's IDCT); the
    pixels must still be the crop's, at the right place, as on the torch backend."""
    from cornpipe.loaders.backends.ffcv_ops import _dct_eighths

    assert [_dct_eighths(side, side, S) for side in (16, 31, 32, 63, 64, 128, 500)] == [8, 8, 4, 4, 2, 1, 1]
    assert _dct_eighths(200, 40, S) == 4  # the shorter side decides
    big = ramp_set(tmp_path / "src", 16, ((90, 120), (120, 90), (140, 140)))  # val crops 78-122 px -> 1/4
    for split, aug, reference in (("val", None, "torch"), ("train", GEOMETRY, "resident")):
        kw = {"augment": aug} if aug else {}
        lo, ref = (make_loader(big, split, backend=b, batch_size=8, image_size=S, workers=1, seed=3,
                               oversample="none", normalization=IMAGENET, **kw)
                   for b in ("ffcv", reference))
        assert_same_pictures(*paired_epoch(lo, ref, 1))


# ---------------------------------------------------------------------------------------------
# DALI: its own webdataset reader


def test_dali_webdataset_reader_keeps_labels_and_reads_each_sample_once(ramps):
    position, grade, ids = ShardSet(ramps).labels("train")
    by_id = {int(i): (int(p), float(g)) for i, p, g in zip(ids, position, grade, strict=True)}
    got = []
    for rank in (0, 1):
        lo = loader(ramps, "dali", rank=rank, world_size=2, augment=GEOMETRY, options={"reader": "webdataset"})
        try:
            images, pos, grd, sid = epoch(lo, 0)
            assert len(sid) == lo.num_samples and len(set(sid.tolist())) == len(sid)
            _, _, _, second = epoch(lo, 1)
            assert sorted(second.tolist()) == sorted(sid.tolist())  # a fixed shard per rank
        finally:
            lo.close()
        for k, i in enumerate(sid.tolist()):
            assert (pos[k].item(), grd[k].item()) == by_id[i]
            # blue encodes the position and survives crops, flips and turns
            blue = pixels(images[k : k + 1])[0, 2].mean().item()
            assert abs(blue - (40 + 80 * by_id[i][0])) < 12, (i, blue)
        got.append(sid.tolist())
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == sorted(ids.tolist())


def test_dali_webdataset_reader_refuses_oversampling(ramps):
    with pytest.raises(LoaderError, match="webdataset reader cannot oversample"):
        loader(ramps, "dali", oversample="balanced", options={"reader": "webdataset"})
    with pytest.raises(LoaderError, match="unknown DALI reader 'tfrecord'"):
        loader(ramps, "dali", options={"reader": "tfrecord"})


# ---------------------------------------------------------------------------------------------
# lifecycle: abandoned epochs, shared compiled Loaders, processes, threads


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_an_abandoned_epoch_does_not_disturb_the_next(backend, ramps):
    before = children()
    lo = loader(ramps, backend, oversample="balanced", workers=2)
    try:
        _, _, _, full = epoch(lo, 0)
        lo.set_epoch(1)
        for k, _ in enumerate(lo):
            if k == 1:
                break  # leave epoch 1 after two batches
        half = iter(lo)  # and another pass left suspended after one batch
        next(half)
        _, _, _, replay = epoch(lo, 0)
        assert torch.equal(full, replay)
    finally:
        lo.close()
    assert children() <= before  # DALI's worker processes are gone


def test_ffcv_loaders_sharing_a_compiled_loader_keep_their_batch_sizes(ramps):
    threads = torch.get_num_threads()
    small = loader(ramps, "ffcv", batch_size=5, workers=2)
    large = loader(ramps, "ffcv", batch_size=20, workers=2)
    try:
        assert small._loader is large._loader  # one FFCV Loader (one JIT compile) for both
        sizes_small = [len(b.sample_id) for b in small]
        sizes_large = [len(b.sample_id) for b in large]
    finally:
        small.close()
        large.close()
    n = small.num_samples
    assert sizes_small == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    assert sizes_large == [20] * (n // 20) + ([n % 20] if n % 20 else [])
    assert torch.get_num_threads() == threads  # FFCV's thread setting is undone


def test_ffcv_process_cache_gives_the_same_batches_as_the_os_cache(ramps):
    os_cache = loader(ramps, "ffcv", augment=ROT_AUG, oversample="balanced", workers=2)
    process = loader(ramps, "ffcv", augment=ROT_AUG, oversample="balanced", workers=2,
                     options={"os_cache": False})
    try:
        a, *_, ids = epoch(os_cache, 1)
        b, *_, ids_b = epoch(process, 1)
    finally:
        os_cache.close()
        process.close()
    assert torch.equal(ids, ids_b) and torch.equal(a, b)


def test_dali_spawned_workers_give_the_same_epoch(ramps):
    forked = loader(ramps, "dali", oversample="sqrt", augment=ROT_AUG)
    spawned = loader(ramps, "dali", oversample="sqrt", augment=ROT_AUG, options={"py_start_method": "spawn"})
    try:
        a, *_, ids = epoch(forked, 1)
        b, *_, ids_b = epoch(spawned, 1)
    finally:
        forked.close()
        spawned.close()
    assert torch.equal(ids, ids_b) and torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# CUDA


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("backend, options", [("ffcv", {}), ("dali", {}), ("dali", {"reader": "webdataset"})])
def test_cuda_batches_match_the_cpu_batches(backend, options, ramps):
    """FFCV ToDevice / DALI mixed (nvJPEG) decode: fp16 channels_last on the GPU, same images as on CPU."""
    kw = {"augment": False, "options": options, "workers": 2}
    gpu = loader(ramps, backend, device="cuda", **kw)
    cpu = loader(ramps, backend, **kw)
    try:
        for images, position, grade, sample_id in gpu:
            assert images.is_cuda and images.dtype == torch.float16
            assert images.is_contiguous(memory_format=torch.channels_last)
            assert position.is_cuda and grade.is_cuda and sample_id.is_cuda
        g, _, _, gid = epoch(gpu, 0)
        c, _, _, cid = epoch(cpu, 0)
    finally:
        gpu.close()
        cpu.close()
    order_g, order_c = gid.argsort(), cid.argsort()
    assert torch.equal(gid[order_g], cid[order_c])
    # nvJPEG vs libjpeg-turbo and fp16 rounding differ by a few levels at most
    assert (pixels(g[order_g]) - pixels(c[order_c])).abs().mean(dim=(1, 2, 3)).max() < 4.0


@pytest.mark.gpu
@cuda
def test_cuda_dali_augmented_epoch_replays(ramps):
    lo = loader(ramps, "dali", device="cuda", augment=ROT_AUG, oversample="balanced", workers=2)
    try:
        a, _, _, ids = epoch(lo, 1)
        b, _, _, ids_b = epoch(lo, 1)
    finally:
        lo.close()
    assert torch.equal(ids, ids_b)
    assert (pixels(a) - pixels(b)).abs().max() < 1.0  # GPU resize may differ in the last bit only
