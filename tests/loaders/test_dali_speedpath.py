"""The dali backend's fast path (issue 12): ROI decoding of the drawn crop, one external-source call per
batch, and normalisation inside DALI when there is no colour jitter. Whatever path a request takes,
the batches are the reference backend's (resident: the same per-batch augmentation draw), in the
dtype and memory format the request names, and they stay intact while the loader runs on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cornpipe.loaders import make_loader
from cornpipe.loaders.base import IMAGENET, MEAN_255, STD_255, AugmentConfig
from cornpipe.loaders.common import make_spec

pytest.importorskip("nvidia.dali")

from cornpipe.loaders.backends.dali_source import SourceSpec, geometry  # noqa: E402 - needs DALI's package only for the loader

S = 32  # output side, px: about the crops' size, so a crop off by a row or a wrong flip shows
NO_JITTER = AugmentConfig(rot90=True, brightness=0.0, contrast=0.0, saturation=0.0)
JITTER = AugmentConfig(rot90=True)


def pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised (B, 3, S, S) images back to 0..255, float32."""
    return images.float() * torch.tensor(STD_255).view(1, 3, 1, 1) + torch.tensor(MEAN_255).view(1, 3, 1, 1)


def epoch_of(root: Path, backend: str, e: int = 1, **kw) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Epoch e's image batches (as yielded) and sample ids of a fresh loader, closed after."""
    kw = {"batch_size": 10, "image_size": S, "workers": 2, "seed": 5, "oversample": "balanced",
          "normalization": IMAGENET, **kw}
    lo = make_loader(root, "train", backend=backend, **kw)
    try:
        lo.set_epoch(e)
        batches = list(lo)
    finally:
        lo.close()
    return [b.images for b in batches], torch.cat([b.sample_id for b in batches])


def assert_same_images(a: torch.Tensor, ref: torch.Tensor) -> None:
    """JPEG ROI decoding and DALI's resize filter leave a grey level or two; a crop off by a row,
    a missing flip or turn, or a wrong mean/std moves most pixels by far more."""
    error = (pixels(a) - pixels(ref)).abs().mean(dim=(1, 2, 3))
    assert error.max() < 4.0, error.max()


def test_the_decoded_window_holds_the_drawn_box_and_its_flips(tiny_shards: Path) -> None:
    from cornpipe.loaders.common import augment_params
    from cornpipe.shards.shard_set import ShardSet

    spec = make_spec("train", batch_size=16, augment=AugmentConfig(scale=(0.05, 1.0)), normalization=IMAGENET)
    rng = np.random.default_rng(0)
    hw = np.stack([rng.integers(20, 300, 64), rng.integers(20, 300, 64)], axis=1)
    position, grade, _ = ShardSet(tiny_shards).labels("train")
    src = SourceSpec(loader=spec, tars=[], shard=np.zeros(64, np.int32), offset=np.zeros(64, np.int64),
                     size=np.zeros(64, np.int64), hw=hw, position=position, grade=grade, plan="")
    for b in range(20):
        rows = rng.integers(0, 64, 16)
        g = geometry(src, rows, user_epoch=3, batch=b)
        p = augment_params(spec, hw[rows], 3, b)
        x0, y0 = g.anchor.T
        w, h = g.shape.T
        assert (x0 >= 0).all() and (y0 >= 0).all() and (w >= 1).all() and (h >= 1).all()
        assert (x0 + w <= hw[rows, 1]).all() and (y0 + h <= hw[rows, 0]).all()
        top, left, bh, bw = p.boxes.T
        lo, hi = np.minimum(g.roi_start, g.roi_end), np.maximum(g.roi_start, g.roi_end)
        np.testing.assert_allclose(lo, np.stack([top - y0, left - x0], 1), atol=1e-4)  # the box, in the window
        np.testing.assert_allclose(hi - lo, np.stack([bh, bw], 1), atol=1e-4)
        assert (hi[:, 0] <= h + 1e-4).all() and (hi[:, 1] <= w + 1e-4).all()
        flipped = g.roi_start > g.roi_end  # a flip is a reversed edge, nothing else is
        assert flipped[:, 0].tolist() == p.vflip.tolist() and flipped[:, 1].tolist() == p.hflip.tolist()
        assert g.angle.tolist() == (90.0 * p.rot90).tolist()


@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.float32, True),
                                                  (torch.float16, False)])
def test_unjittered_batches_normalised_in_dali_are_the_reference_images(tiny_shards, dtype, channels_last):
    kw = {"augment": NO_JITTER, "dtype": dtype, "channels_last": channels_last}
    dali, ids = epoch_of(tiny_shards, "dali", **kw)
    ref, ref_ids = epoch_of(tiny_shards, "resident", augment=NO_JITTER)
    assert torch.equal(ids, ref_ids)
    for images in dali:
        assert images.dtype == dtype and images.shape[1:] == (3, S, S) and images.device.type == "cpu"
        assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_same_images(torch.cat(dali), torch.cat(ref))


def test_jittered_batches_are_the_reference_images(tiny_shards):
    dali, ids = epoch_of(tiny_shards, "dali", augment=JITTER)
    ref, ref_ids = epoch_of(tiny_shards, "resident", augment=JITTER)
    assert torch.equal(ids, ref_ids)
    assert all(images.is_contiguous() and images.dtype == torch.float32 for images in dali)
    assert_same_images(torch.cat(dali), torch.cat(ref))


def test_jitter_finished_in_torch_where_dali_cannot_gives_the_same_batches(tiny_shards, monkeypatch):
    """The jitter runs in DALI's threads with the per-image kernel; without numba (or DALI's numba
    plugin) torch finishes the crops with the fused batch kernel: the same images either way, within
    the float rounding of the contrast centre, summed in another order (a level is ~0.017 normalised)."""
    import cornpipe.loaders.backends.dali_loader as dali_loader

    in_dali, ids = epoch_of(tiny_shards, "dali", augment=JITTER, channels_last=True)
    monkeypatch.setattr(dali_loader, "jitter_op", lambda mean, std: None)
    in_torch, ids_t = epoch_of(tiny_shards, "dali", augment=JITTER, channels_last=True)
    assert torch.equal(ids, ids_t)
    assert all(a.is_contiguous(memory_format=torch.channels_last) for a in in_dali + in_torch)
    for a, b in zip(in_dali, in_torch, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_validation_batches_are_the_reference_images(tiny_shards):
    kw = {"batch_size": 10, "image_size": S, "workers": 2, "oversample": "none", "normalization": IMAGENET}
    dali = make_loader(tiny_shards, "val", backend="dali", **kw)
    ref = make_loader(tiny_shards, "val", backend="resident", **kw)
    try:
        a = list(dali)
        r = list(ref)
    finally:
        dali.close()
        ref.close()
    assert torch.equal(torch.cat([b.sample_id for b in a]), torch.cat([b.sample_id for b in r]))
    assert_same_images(torch.cat([b.images for b in a]), torch.cat([b.images for b in r]))


def test_batches_handed_out_without_a_copy_stay_intact(tiny_shards):
    """DALI's normalised output reaches torch without a copy: a batch kept by the caller must not
    change while the loader runs on (more batches, the next epoch, a replay)."""
    lo = make_loader(tiny_shards, "train", backend="dali", batch_size=10, image_size=S, workers=2,
                     augment=NO_JITTER, normalization=IMAGENET, oversample="none")
    try:
        kept = list(lo)
        copies = [b.images.clone() for b in kept]
        lo.set_epoch(1)
        later = list(lo)
        lo.set_epoch(0)
        replay = list(lo)
    finally:
        lo.close()
    sizes = [len(b.sample_id) for b in kept]
    assert sizes[:-1] == [10] * (len(sizes) - 1) and 0 < sizes[-1] <= 10  # a short last batch, no padding
    assert all(torch.equal(b.images, c) for b, c in zip(kept, copies, strict=True))
    assert all(torch.equal(b.images, r.images) for b, r in zip(kept, replay, strict=True))
    assert not torch.equal(later[0].images, kept[0].images)


def test_host_only_batches_are_the_uint8_crops_of_the_normalised_ones(tiny_shards):
    """dtype torch.uint8: DALI's crops as they are, (B, S, S, 3) uint8 NHWC: the normalised batch's pixels."""
    crops, ids = epoch_of(tiny_shards, "dali", augment=NO_JITTER, dtype=torch.uint8)
    images, ids_f = epoch_of(tiny_shards, "dali", augment=NO_JITTER)
    assert torch.equal(ids, ids_f)
    for c in crops:
        assert c.dtype == torch.uint8 and c.shape[1:] == (S, S, 3) and c.is_contiguous()
    back = pixels(torch.cat(images)).permute(0, 2, 3, 1)
    assert (back - torch.cat(crops).float()).abs().max() < 0.01
