"""Augmentation draws: one sampler (`sample_params`) every backend uses, and the fixed validation
transform's parameters (`val_params`). How the draws are applied: `loaders.pixels.augment`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cornpipe.loaders.base import AugmentConfig

CROP_TRIES = 10  # torchvision's RandomResizedCrop


@dataclass(frozen=True)
class AugParams:
    """Augmentation draws for B images. Boxes are in pixels of each source image."""

    boxes: np.ndarray  # (B, 4) float64: top, left, height, width
    hflip: np.ndarray  # (B,) bool
    vflip: np.ndarray  # (B,) bool
    rot90: np.ndarray  # (B,) int64 in 0..3, counter-clockwise quarter turns
    jitter: np.ndarray  # (B, 3) float32: brightness, contrast, saturation factors (1 = unchanged)

    def __len__(self) -> int:
        return len(self.boxes)

    def row(self, i: int) -> AugParams:
        """The draws of image i as a batch of one."""
        s = slice(i, i + 1)
        return AugParams(self.boxes[s], self.hflip[s], self.vflip[s], self.rot90[s], self.jitter[s])


def _as_sizes(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)  # (B, 2): height, width
    return sizes[:, 0], sizes[:, 1]


def random_resized_crop_boxes(
    rng: np.random.Generator, sizes: np.ndarray, scale: tuple[float, float], ratio: tuple[float, float]
) -> np.ndarray:
    """torchvision RandomResizedCrop boxes for B images of (height, width) `sizes` -> (B, 4)."""
    height, width = _as_sizes(sizes)
    b = len(height)
    area = (height * width)[:, None]
    target_area = area * rng.uniform(scale[0], scale[1], size=(b, CROP_TRIES))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), size=(b, CROP_TRIES)))
    w = np.rint(np.sqrt(target_area * aspect))
    h = np.rint(np.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.argmax(axis=1)
    ok = fits[np.arange(b), first]
    ch = h[np.arange(b), first]
    cw = w[np.arange(b), first]
    # Fallback: the largest centred crop with an allowed ratio.
    in_ratio = width / height
    lo, hi = min(ratio), max(ratio)
    fw = np.where(in_ratio < lo, width, np.where(in_ratio > hi, np.rint(height * hi), width))
    fh = np.where(in_ratio < lo, np.rint(width / lo), height)
    ch = np.where(ok, ch, fh)
    cw = np.where(ok, cw, fw)
    # One integer draw per image even where the fallback wins keeps the stream layout fixed.
    top_rand = rng.integers(0, np.maximum(height - ch, 0).astype(np.int64) + 1)
    left_rand = rng.integers(0, np.maximum(width - cw, 0).astype(np.int64) + 1)
    top = np.where(ok, top_rand, (height - ch) // 2)
    left = np.where(ok, left_rand, (width - cw) // 2)
    return np.stack([top, left, ch, cw], axis=1).astype(np.float64)


def center_boxes(sizes: np.ndarray, crop_fraction: float) -> np.ndarray:
    """Validation boxes: the centred square of side min(h, w) * crop_fraction -> (B, 4)."""
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"val_crop_fraction must be in (0, 1], got {crop_fraction}")
    height, width = _as_sizes(sizes)
    side = np.minimum(height, width) * crop_fraction
    return np.stack([(height - side) / 2, (width - side) / 2, side, side], axis=1)


def sample_params(rng: np.random.Generator, sizes: np.ndarray, config: AugmentConfig) -> AugParams:
    """Draw train-time augmentation for B images of (height, width) `sizes`."""
    boxes = random_resized_crop_boxes(rng, sizes, config.scale, config.ratio)
    b = len(boxes)
    hflip = rng.random(b) < 0.5
    vflip = rng.random(b) < 0.5
    rot = rng.integers(0, 4, size=b)
    strengths = np.array([config.brightness, config.contrast, config.saturation], dtype=np.float64)
    jitter = rng.uniform(1.0 - strengths, 1.0 + strengths, size=(b, 3))
    return AugParams(
        boxes=boxes,
        hflip=hflip & config.hflip,
        vflip=vflip & config.vflip,
        rot90=(rot if config.rot90 else np.zeros(b, dtype=np.int64)).astype(np.int64),
        jitter=np.where(strengths > 0, jitter, 1.0).astype(np.float32),
    )


def val_params(sizes: np.ndarray, crop_fraction: float) -> AugParams:
    """The deterministic validation transform as AugParams (centre box, no flips, no jitter)."""
    boxes = center_boxes(sizes, crop_fraction)
    b = len(boxes)
    return AugParams(boxes, np.zeros(b, bool), np.zeros(b, bool), np.zeros(b, np.int64),
                     np.ones((b, 3), np.float32))
