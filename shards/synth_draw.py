"""Drawing one synthetic maize-leaf photo; see `shards.synth` for what the picture encodes.

`render_image` is a pure function of (seed, source, image index, image size, grade scale): the image
and its grade come from a numpy Generator seeded by (seed, source index, image index), and the
drawing is plain numpy + PIL, so the same arguments give the same JPEG bytes in any process.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from cornpipe.shards.fields import SOURCES

# Leaf colour (hue in degrees, saturation, value) and width (fraction of the frame) per position.
_LEAF_HSV: dict[str, tuple[float, float, float]] = {
    "l": (52.0, 0.62, 0.55),  # older, yellow-olive, darker
    "m": (95.0, 0.60, 0.58),  # mid green
    "t": (130.0, 0.48, 0.80),  # young, light blue-green
}
_LEAF_WIDTH: dict[str, float] = {"l": 0.86, "m": 0.72, "t": 0.58}
_STAGE_WIDTH: dict[int, float] = {9: 0.93, 14: 1.0, 19: 1.07}
_MAX_LESION_FRACTION = 0.5  # share of the leaf covered by lesions at the highest grade
_LESION_CELLS = 8  # lesions are spread evenly over an 8 x 8 grid of frame cells


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One colour, hue in degrees -> float32 RGB in 0..255."""
    h = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    table = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)]
    r, g, b = table[int(h) % 6]
    m = v - c
    return np.array([r + m, g + m, b + m], dtype=np.float32) * 255.0


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in frame units, x and y in [-0.5, 0.5]."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    return axis[None, :].repeat(size, 0), axis[:, None].repeat(size, 1)


def _smooth_field(rng: np.random.Generator, size: int, cells: int, low: float, high: float) -> np.ndarray:
    """A low-frequency random field in [low, high] (lighting, blotches)."""
    coarse = rng.uniform(low, high, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))


def _grade_level(grade: int, scale: tuple[int, ...]) -> float:
    """0 for the healthy (lowest) grade, 1 for the highest; linear in the grade value."""
    return (grade - scale[0]) / (scale[-1] - scale[0])


def _draw_lesions(
    rng: np.random.Generator, img: np.ndarray, leaf: np.ndarray, theta: float, level: float
) -> None:
    """Paint necrotic lesions onto img (3, H, W) in place; their total area grows with level."""
    size = img.shape[1]
    if level <= 0:
        return
    leaf_area = float(leaf.mean())  # frame fraction
    # covered share of the leaf ~ linear in level; lesions overlap at random, so the drawn area is
    # -ln(1 - share) leaf areas (the Boolean model's coverage) to land near the share
    share = _MAX_LESION_FRACTION * level * rng.uniform(0.92, 1.08)
    count = max(1, round((6 + 40 * level) * rng.uniform(0.85, 1.15)))
    mean_area = -math.log(1 - share) * leaf_area / count
    centre_rgb = _hsv_to_rgb(rng.uniform(30, 38), rng.uniform(0.35, 0.5), rng.uniform(0.68, 0.8))
    rim_rgb = _hsv_to_rgb(rng.uniform(20, 28), rng.uniform(0.55, 0.7), rng.uniform(0.28, 0.38))
    halo_rgb = _hsv_to_rgb(50.0, 0.6, 0.72)
    ys, xs = np.nonzero(leaf[::4, ::4] > 0.95)  # candidate centres, well inside the leaf
    if len(ys) == 0:
        return
    # spread lesions evenly (systematic sampling over candidates grouped by frame cell, shuffled
    # within a cell): each cell gets lesions in proportion to its leaf area, so any crop of the
    # leaf sees about the same lesion density
    cells = (ys * 4 * _LESION_CELLS // size) * _LESION_CELLS + xs * 4 * _LESION_CELLS // size
    order = np.lexsort((rng.random(len(cells)), cells))
    picks = order[((np.arange(count) + rng.random()) * (len(order) / count)).astype(np.int64)]
    for k in range(count):
        area = mean_area * float(rng.lognormal(0.0, 0.3))
        aspect = rng.uniform(2.5, 5.0)
        b = math.sqrt(area / (math.pi * aspect))  # semi-axes in frame units
        a = b * aspect
        angle = theta + rng.normal(0.0, 0.12)
        cy = (int(ys[picks[k]]) * 4 + rng.uniform(0, 4)) / size
        cx = (int(xs[picks[k]]) * 4 + rng.uniform(0, 4)) / size
        wobble, phase = rng.uniform(0.05, 0.18), rng.uniform(0, 2 * math.pi)
        c, s = math.cos(angle), math.sin(angle)
        reach_x = 1.45 * math.hypot(a * c, b * s)  # half extent of the rotated ellipse (+ halo)
        reach_y = 1.45 * math.hypot(a * s, b * c)
        x0, x1 = max(0, int((cx - reach_x) * size)), min(size, int((cx + reach_x) * size) + 2)
        y0, y1 = max(0, int((cy - reach_y) * size)), min(size, int((cy + reach_y) * size) + 2)
        if x1 <= x0 or y1 <= y0:
            continue
        dx = (np.arange(x0, x1, dtype=np.float32) + 0.5) / size - cx
        dy = (np.arange(y0, y1, dtype=np.float32) + 0.5) / size - cy
        dx, dy = dx[None, :], dy[:, None]
        du = (dx * c + dy * s) / a
        dv = (-dx * s + dy * c) / b
        rho = np.sqrt(du * du + dv * dv)
        cos1, sin1 = du / (rho + 1e-6), dv / (rho + 1e-6)
        # sin(3 phi + phase) by the triple-angle formulas: an irregular outline without arctan2
        sin3, cos3 = sin1 * (3 - 4 * sin1 * sin1), cos1 * (4 * cos1 * cos1 - 3)
        r = rho * (1 + wobble * (sin3 * math.cos(phase) + cos3 * math.sin(phase)))
        soft = 1.5 / max(b * size, 1.0)  # anti-aliasing width in r units
        core = np.clip((1.0 - r) / soft, 0.0, 1.0)
        halo = 0.35 * np.clip((1.4 - r) / 0.4, 0.0, 1.0) * (1.0 - core)
        rim = np.clip((r - 0.55) / 0.45, 0.0, 1.0)
        on_leaf = leaf[y0:y1, x0:x1]
        wh, wc = halo * on_leaf, core * on_leaf
        patch = img[:, y0:y1, x0:x1]  # (3, h, w) view
        for ch in range(3):
            colour = centre_rgb[ch] + (rim_rgb[ch] - centre_rgb[ch]) * rim
            patch[ch] += (halo_rgb[ch] - patch[ch]) * wh
            patch[ch] += (colour - patch[ch]) * wc


def render_image(
    seed: int, source: str, index: int, image_size: int, grade_scale: Sequence[int]
) -> tuple[int, bytes]:
    """Draw image `index` of `source`: returns (grade, JPEG bytes). A pure function of its arguments."""
    scale = tuple(grade_scale)
    source_index = SOURCES.index(source)
    rng = np.random.default_rng(np.random.SeedSequence([seed, source_index, index]))
    grade = int(scale[int(rng.integers(0, len(scale)))])
    stage, code = int(source[:-1]), source[-1]
    size = image_size
    xs, ys = _grid(size)

    # background: out-of-focus soil, unrelated to the labels. Planes are channel-first (3, H, W):
    # per-plane broadcasting is much faster than (H, W, 3) on one core.
    soil = _hsv_to_rgb(rng.uniform(18, 40), rng.uniform(0.2, 0.5), rng.uniform(0.22, 0.45))
    blotches = _smooth_field(rng, size, 6, 0.7, 1.25)  # (H, W)

    # the leaf: a long, slightly curved, tapering band through the frame at a random angle
    theta = rng.uniform(0, math.pi)
    c, s = math.cos(theta), math.sin(theta)
    cx, cy = (float(t) for t in rng.normal(0, 0.05, size=2))  # python floats keep float32 math
    u = (xs - cx) * c + (ys - cy) * s  # along the leaf
    v = -(xs - cx) * s + (ys - cy) * c  # across the leaf
    v = np.abs(v - rng.uniform(-0.35, 0.35) * u * u)
    half = 0.5 * _LEAF_WIDTH[code] * _STAGE_WIDTH[stage] * rng.uniform(0.92, 1.08)
    edge = half * (1 - rng.uniform(0.0, 0.3) * u) + 0.01 * np.sin(u * rng.uniform(15, 30) + rng.uniform(0, 6))
    leaf = np.clip((edge - v) * (size / 1.5), 0.0, 1.0)  # (H, W) coverage, anti-aliased

    h, sat, val = _LEAF_HSV[code]
    leaf_rgb = _hsv_to_rgb(h + rng.normal(0, 5), sat * rng.uniform(0.88, 1.1), val * rng.uniform(0.9, 1.1))
    across = v / np.maximum(edge, 1e-3)
    veins = 1 + 0.05 * np.cos(v * (2 * math.pi * rng.uniform(9, 13) / half))
    midrib = np.clip((0.012 - v) * (size / 1.5), 0.0, 1.0) * 0.45  # pale central vein
    leaf_gain = (1 - 0.18 * across * across) * veins * (1 - midrib) * leaf  # (H, W)
    pale = 215.0 * midrib * leaf
    bg_gain = blotches * (1 - leaf)
    img = np.empty((3, size, size), dtype=np.float32)  # (3, H, W)
    for ch in range(3):
        img[ch] = bg_gain * soil[ch] + leaf_gain * leaf_rgb[ch] + pale

    # harmless pale specks (dust, insect feeding): noise a grade model must ignore
    for _ in range(int(rng.integers(0, 6))):
        px, py = int(rng.integers(0, size)), int(rng.integers(0, size))
        radius = rng.uniform(0.004, 0.009) * size  # px
        x0, x1 = max(0, px - int(radius) - 2), min(size, px + int(radius) + 3)
        y0, y1 = max(0, py - int(radius) - 2), min(size, py + int(radius) + 3)
        dist = np.hypot(np.arange(x0, x1)[None, :] - px, np.arange(y0, y1)[:, None] - py)
        spot = np.clip((radius - dist) / 1.2, 0, 1) * leaf[y0:y1, x0:x1]
        img[:, y0:y1, x0:x1] += (np.float32(225.0) - img[:, y0:y1, x0:x1]) * spot

    _draw_lesions(rng, img, leaf, theta, _grade_level(grade, scale))

    # lighting and sensor noise (luminance)
    light = _smooth_field(rng, size, 4, 0.82, 1.12) * rng.uniform(0.9, 1.08)
    noise = rng.standard_normal((size, size), dtype=np.float32) * rng.uniform(2.0, 5.0) + 0.5
    img = img * light + noise
    pixels = np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)  # (H, W, 3)
    picture = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    picture = picture.filter(ImageFilter.BoxBlur(radius=rng.uniform(0.4, 0.9) * size / 512))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=int(rng.integers(85, 93)), optimize=False)
    return grade, buffer.getvalue()
