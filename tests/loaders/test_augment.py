"""Augmentation (loaders.pixels.augment): crop parameters, the PIL and batched paths agree, jitter, val."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cornpipe.loaders.base import HOST_DTYPE, IMAGENET, MEAN_255, STD_255, AugmentConfig
from cornpipe.loaders.pixels import finish_cpu
from cornpipe.loaders.pixels.augment import apply_geometry_pil, augment_batch, pil_to_tensor, val_preprocess
from cornpipe.loaders.pixels.finish import color_jitter_batch, finish_batch, normalize_batch, value_range
from cornpipe.loaders.pixels.geometry import crop_resize_batch, flip_rot_batch
from cornpipe.loaders.pixels.params import AugParams, center_boxes, random_resized_crop_boxes, sample_params


def gradient_image(h: int = 60, w: int = 80) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1).astype(np.uint8)


def test_crop_boxes_follow_torchvision_semantics():
    rng = np.random.default_rng(0)
    sizes = np.array([[60, 80], [80, 60], [50, 50]] * 400)
    boxes = random_resized_crop_boxes(rng, sizes, (0.35, 1.0), (3 / 4, 4 / 3))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= sizes[:, 0]).all() and (left + w <= sizes[:, 1]).all()
    area = h * w / (sizes[:, 0] * sizes[:, 1])
    assert area.min() > 0.3 and area.max() <= 1.0  # rounding can take a box a little below 0.35
    assert (w / h > 0.7).all() and (w / h < 1.4).all()
    assert len({tuple(b) for b in boxes}) > 1000  # different per sample
    # No try fits a 300x20 strip: torchvision's fallback is the centred 27x20 crop.
    strip = random_resized_crop_boxes(rng, np.array([[300, 20]]), (0.35, 1.0), (3 / 4, 4 / 3))
    assert strip.tolist() == [[136.0, 0.0, 27.0, 20.0]]


def test_config_switches_turn_steps_off():
    rng = np.random.default_rng(1)
    off = AugmentConfig(hflip=False, vflip=False, rot90=False, brightness=0, contrast=0, saturation=0)
    p = sample_params(rng, np.array([[40, 40]] * 64), off)
    assert not p.hflip.any() and not p.vflip.any() and not p.rot90.any()
    assert (p.jitter == 1).all()
    on = sample_params(rng, np.array([[40, 40]] * 64), AugmentConfig(rot90=True))
    assert on.hflip.any() and on.vflip.any() and set(on.rot90.tolist()) == {0, 1, 2, 3}
    assert (np.abs(on.jitter - 1) <= 0.2 + 1e-6).all() and (on.jitter != 1).all()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=["cpu-uint8", "roi_align"])
def test_pil_and_batched_paths_give_the_same_pixels(dtype):
    image = gradient_image()
    rng = np.random.default_rng(2)
    params = sample_params(rng, np.array([[60, 80]] * 12), AugmentConfig(rot90=True))
    batch = torch.from_numpy(image.transpose(2, 0, 1))[None].repeat(12, 1, 1, 1).to(dtype)
    tensors = flip_rot_batch(crop_resize_batch(batch, params.boxes, 24), params)
    for i in range(12):
        pil = pil_to_tensor(apply_geometry_pil(Image.fromarray(image), params.row(i), 24)).float()
        assert (pil - tensors[i]).abs().mean() < 1.5, i  # same crop, same flips, same rotation


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=["cpu-uint8", "roi_align"])
def test_padding_beyond_the_image_never_leaks_into_crops(dtype):
    image = torch.from_numpy(gradient_image(30, 40).transpose(2, 0, 1))[None].to(dtype)
    padded = torch.zeros((1, 3, 50, 60), dtype=dtype)
    padded[:, :, :30, :40] = image
    padded[:, :, 30, :40] = image[:, :, 29]  # what the resident backend stores: one replicated row/col
    padded[:, :, :31, 40] = padded[:, :, :31, 39]
    box = np.array([[10.0, 15.0, 20.0, 25.0]])  # touches the bottom and right edges
    assert torch.allclose(crop_resize_batch(image, box, 16), crop_resize_batch(padded, box, 16), atol=1e-3)


def test_color_jitter_factors():
    x = torch.rand(2, 3, 8, 8) * 200 + 20
    assert torch.equal(color_jitter_batch(x.clone(), np.ones((2, 3))), x)
    brighter = color_jitter_batch(x.clone(), np.array([[1.1, 1, 1], [2.0, 1, 1]]))
    assert torch.allclose(brighter[0], x[0] * 1.1) and brighter[1].max() == 255  # clamped
    flat = color_jitter_batch(x.clone(), np.array([[1, 0, 1], [1, 1, 0]]))
    assert flat[0].std() < 1e-3  # contrast 0: the image's mean grey everywhere
    assert torch.allclose(flat[1][0], flat[1][1]) and torch.allclose(flat[1][1], flat[1][2])  # grey


def test_color_jitter_matches_torchvision_in_the_fixed_order():
    import torchvision.transforms.v2.functional as TF

    x = torch.rand(4, 3, 16, 16) * 255
    factors = np.array([[1.1, 0.8, 1.2], [0.9, 1.2, 0.7], [1, 1, 1], [1.2, 1.2, 1.2]], np.float32)
    ours = color_jitter_batch(x.clone(), factors)
    for i, (b, c, s) in enumerate(factors.tolist()):
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[i] / 255, b), c), s) * 255
        assert torch.allclose(ours[i], ref, atol=0.05), i


@pytest.mark.skipif(not finish_cpu.AVAILABLE, reason="needs numba")
def test_fused_cpu_finish_computes_what_the_tensor_ops_compute():
    """The CPU loaders finish batches in one numba pass; it must be the same jitter + normalise,
    clamps included (bright images with strong brightness clamp at every step)."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (6, 3, 20, 28), dtype=torch.uint8, generator=gen)
    pixels[4] = 250  # flat and bright: brightness 1.4 saturates, the contrast centre moves
    factors = np.array([[1.4, 0.6, 1.4], [0.6, 1.4, 0.6], [1, 1, 1], [1, 0, 1], [1.4, 1.3, 0], [1.0, 1.2, 1.0]],
                       np.float32)
    want = finish_batch(pixels, factors, fast=False, norm=IMAGENET)
    got = finish_batch(pixels, factors, fast=True, norm=IMAGENET)
    assert got.shape == want.shape == (6, 3, 20, 28) and got.dtype == torch.float32 and got.is_contiguous()
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # interleaved (B, H, W, 3) input, as FFCV and DALI hand it over; a strided view; no jitter
    hwc = pixels.permute(0, 2, 3, 1).contiguous()
    assert torch.allclose(finish_batch(hwc, factors, hwc=True, fast=True, norm=IMAGENET), want, atol=1e-4)
    view = pixels[:, :, ::2, 1:]
    assert torch.allclose(finish_batch(view, factors, fast=True, norm=IMAGENET), finish_batch(view, factors, fast=False, norm=IMAGENET), atol=1e-4)
    assert torch.allclose(finish_batch(pixels, None, fast=True, norm=IMAGENET), normalize_batch(pixels.float(), norm=IMAGENET), atol=1e-4)
    nhwc = finish_batch(pixels, factors, channels_last=True, fast=True, norm=IMAGENET)  # written NHWC by the kernel itself
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and torch.allclose(nhwc, want, atol=1e-4)
    half = finish_batch(pixels, factors, dtype=torch.float16, channels_last=True, fast=True, norm=IMAGENET)
    assert half.dtype == torch.float16 and half.is_contiguous(memory_format=torch.channels_last)
    assert finish_batch(pixels[:0], factors[:0], fast=True, norm=IMAGENET).shape == (0, 3, 20, 28)


@pytest.mark.skipif(not finish_cpu.AVAILABLE, reason="needs numba")
def test_flips_folded_into_the_fused_finish_are_flip_rot_batchs():
    """The resident backend hands its flips to the fused pass (rows written backwards / in reverse
    order) instead of flipping uint8 copies: the same images as flip_rot_batch then the finish, on
    every path (fused, tensor ops, interleaved input, host-only), and the input is left alone."""
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (4, 3, 6, 9), dtype=torch.uint8, generator=gen)  # not square
    before = pixels.clone()
    hflip, vflip = np.array([False, True, False, True]), np.array([False, False, True, True])
    factors = np.array([[1.3, 0.7, 1.2], [0.8, 1.2, 0.9], [1, 1, 1], [1.1, 1.0, 0.5]], np.float32)
    params = AugParams(np.zeros((4, 4)), hflip, vflip, np.zeros(4, np.int64), factors)
    want = finish_batch(flip_rot_batch(pixels.clone(), params), factors, fast=False, norm=IMAGENET)
    for fast in (True, False):
        got = finish_batch(pixels, factors, fast=fast, flips=(hflip, vflip), norm=IMAGENET)
        assert torch.allclose(got, want, atol=1e-4), (fast, (got - want).abs().max())
    hwc = pixels.permute(0, 2, 3, 1).contiguous()
    got = finish_batch(hwc, factors, hwc=True, fast=True, flips=(hflip, vflip), norm=IMAGENET)
    assert torch.allclose(got, want, atol=1e-4)
    host = finish_batch(pixels, factors, dtype=HOST_DTYPE, flips=(hflip, vflip), norm=IMAGENET)
    assert torch.equal(host, flip_rot_batch(pixels.clone(), params).permute(0, 2, 3, 1))
    assert torch.equal(pixels, before)


def test_normalize_and_value_range():
    x = torch.tensor([0.0, 255.0]).view(2, 1, 1, 1).expand(2, 3, 4, 4)
    out = normalize_batch(x, dtype=torch.float16, channels_last=True, norm=IMAGENET)
    assert out.dtype == torch.float16 and out.is_contiguous(memory_format=torch.channels_last)
    lo, hi = value_range(IMAGENET)
    assert out.float().min().item() == pytest.approx(lo, abs=1e-2)
    assert out.float().max().item() == pytest.approx(hi, abs=1e-2)
    assert torch.allclose(out[0, :, 0, 0].float(), -torch.tensor(MEAN_255) / torch.tensor(STD_255), atol=1e-2)


def test_val_preprocess_is_a_deterministic_centre_crop():
    # A red frame around a green centre: the centre crop of 0.875 of the shorter side sees green only.
    image = np.zeros((64, 96, 3), np.uint8)
    image[:] = (255, 0, 0)
    image[3:61, 19:77] = (0, 255, 0)
    out = val_preprocess(Image.fromarray(image), 32, 0.875, IMAGENET)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, val_preprocess(Image.fromarray(image), 32, 0.875, IMAGENET))
    pixels = out * torch.tensor(STD_255).view(3, 1, 1) + torch.tensor(MEAN_255).view(3, 1, 1)
    assert pixels[1].min() > 250 and pixels[0].max() < 5
    side = center_boxes(np.array([[64, 96]]), 0.875)[0]
    assert side.tolist() == [4.0, 20.0, 56.0, 56.0]


def test_augment_batch_contract():
    images = torch.randint(0, 256, (5, 3, 40, 50), dtype=torch.uint8)
    params = sample_params(np.random.default_rng(0), np.array([[40, 50]] * 5), AugmentConfig(rot90=True))
    out = augment_batch(images, params, 16, norm=IMAGENET)
    assert out.shape == (5, 3, 16, 16) and out.dtype == torch.float32
    lo, hi = value_range(IMAGENET)
    assert lo - 1e-4 <= out.min().item() and out.max().item() <= hi + 1e-4
