"""Train-time augmentation and the deterministic validation transform, shared by every backend.

One parameter sampler (`sample_params`), two ways to apply its draws:

- per sample on PIL images (`apply_geometry_pil`), used in torch DataLoader workers and by predict;
- on whole batches of uint8 tensors, on CPU or CUDA (`crop_resize_batch`, `flip_rot_batch`,
  `color_jitter_batch`, `normalize_batch`), used by the resident backend and, after the geometry,
  by the torch backend on the device; `finish_batch` (jitter + normalize) runs them as one fused
  numba pass on the CPU (`loaders.fused`).
- host-only batches (dtype uint8, `host_batch`) stop after the geometry: (B, S, S, 3) uint8 crops,
  the jitter and normalisation left to the GPU they are fed to.

Order of operations, the same everywhere: random resized crop -> horizontal flip -> vertical flip
-> rot90 -> brightness -> contrast -> saturation -> normalize (MEAN_255 / STD_255).

- Random resized crop follows torchvision's `RandomResizedCrop.get_params`: up to 10 tries of an
  area fraction in `scale` and a log-uniform aspect ratio (w/h) in `ratio`, rounded to whole pixels;
  when no try fits, the largest centred crop whose ratio is within `ratio`. The box is resized to
  (S, S) with antialiasing: PIL bilinear with box support on the PIL path, torch's uint8 antialias
  bilinear (PIL's filter) for uint8 batches on the CPU, `roi_align` with adaptive sampling (averages
  ceil(box/S) points per output pixel) for batches on CUDA.
- rot90 turns the output by k * 90 degrees counter-clockwise, k uniform in {0, 1, 2, 3}; outputs
  are square (S, S), so every k keeps the shape.
- Colour jitter factors are uniform in [1 - b, 1 + b] (b = 0 disables the step); each step clamps
  to [0, 255] like torchvision. Contrast blends with the image's mean grey level, saturation with
  each pixel's grey level (ITU-R 601: 0.299 R + 0.587 G + 0.114 B). The order is fixed.
- Validation: resize the shorter side to S / val_crop_fraction and centre-crop S, computed as one
  resize of the centred square of side shorter * val_crop_fraction (the same pixels, one filter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cornpipe.loaders import fused
from cornpipe.loaders.base import HOST_DTYPE, IMAGENET, AugmentConfig, Normalization
from cornpipe.loaders.fused import GREY_WEIGHTS

CROP_TRIES = 10  # torchvision's RandomResizedCrop
CROP_KERNELS: tuple[str, ...] = ("auto", "interpolate", "roi_align")
_CHUNK_BYTES = 512 * 2**20  # float32 working set of one crop_resize_batch chunk
_CPU_CHUNK = 4  # images per pass of jitter / normalize on the CPU


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


# ---------------------------------------------------------------------------------------------
# per sample, PIL


def apply_geometry_pil(image: Image.Image, params: AugParams, size: int) -> Image.Image:
    """Crop-resize to (size, size), flip and rotate one PIL image with the draws of `params` (B=1)."""
    top, left, h, w = (float(v) for v in params.boxes[0])
    out = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    if params.hflip[0]:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if params.vflip[0]:
        out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    k = int(params.rot90[0])
    if k:
        out = out.transpose((None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                             Image.Transpose.ROTATE_270)[k])
    return out


def val_transform(image: Image.Image, image_size: int, crop_fraction: float = 0.875) -> Image.Image:
    """Validation view of one PIL image: (image_size, image_size) RGB."""
    image = image.convert("RGB")
    params = val_params(np.array([[image.height, image.width]]), crop_fraction)
    return apply_geometry_pil(image, params, image_size)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 tensor."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def val_preprocess(image: Image.Image, image_size: int, crop_fraction: float = 0.875,
                   norm: Normalization = IMAGENET) -> torch.Tensor:
    """What predict feeds the model: (3, S, S) float32, normalised like every loader's output."""
    pixels = pil_to_tensor(val_transform(image, image_size, crop_fraction))[None].float()
    return normalize_batch(pixels, dtype=torch.float32, norm=norm)[0]


# ---------------------------------------------------------------------------------------------
# whole batches, torch tensors on any device


def use_interpolate(images: torch.Tensor, kernel: str = "auto") -> bool:
    """Whether a crop-resize of `images` runs torch's uint8 antialias kernel (else roi_align).

    kernel: "auto" (uint8 antialias for uint8 on the CPU, roi_align otherwise), "interpolate"
    (CPU uint8 only) or "roi_align".
    """
    if kernel not in CROP_KERNELS:
        raise ValueError(f"unknown crop kernel {kernel!r}; valid: {', '.join(CROP_KERNELS)}")
    fits = images.dtype == torch.uint8 and images.device.type == "cpu"
    if kernel == "interpolate" and not fits:
        raise ValueError("crop kernel 'interpolate' needs uint8 images on the CPU")
    return kernel == "interpolate" or (kernel == "auto" and fits)


def crop_resize_batch(images: torch.Tensor, boxes: np.ndarray | torch.Tensor, size: int,
                      kernel: str = "auto") -> torch.Tensor:
    """(B, 3, H, W) images, (B, 4) top/left/height/width boxes -> (B, 3, S, S) float32 in 0..255.

    uint8 images on the CPU: `crop_resize_uint8` (boxes rounded to whole pixels). Otherwise each box
    is resized with `roi_align` (bilinear with adaptive sampling: ceil(box / S) taps averaged per
    output pixel, i.e. antialiased downscaling), batched in one kernel, which is what runs on CUDA.
    Images may be padded beyond their real extent; boxes only cover real pixels, and the bilinear
    taps read at most one pixel past a box edge (the resident backend replicates that pixel).
    """
    if use_interpolate(images, kernel):
        return crop_resize_uint8(images, boxes, size).float()
    from torchvision.ops import roi_align

    b = images.shape[0]
    boxes_t = torch.as_tensor(boxes, dtype=torch.float32).reshape(b, 4)
    top, left, h, w = boxes_t.unbind(1)
    rois = torch.stack([torch.arange(b, dtype=torch.float32), left, top, left + w, top + h], dim=1)
    rois = rois.to(images.device)
    per_image = 4 * images[0].numel() if b else 1
    chunk = max(1, _CHUNK_BYTES // per_image)
    outs = []
    for start in range(0, b, chunk):
        part = images[start:start + chunk].float()
        part_rois = rois[start:start + chunk].clone()
        part_rois[:, 0] -= start
        outs.append(roi_align(part, part_rois, output_size=(size, size), spatial_scale=1.0,
                              sampling_ratio=-1, aligned=True))
    if not outs:
        return images.new_zeros((0, images.shape[1], size, size), dtype=torch.float32)
    return torch.cat(outs)


def roi_align_window(boxes: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the rows y0:y1 and columns x0:x1 of a (height, width) image that
    `crop_resize_batch`'s roi_align reads for (B, 4) top/left/height/width `boxes`.

    With aligned=True a box [t, t + h) samples at t - 0.5 < y < t + h - 0.5 and each sample reads
    rows floor(y) and floor(y) + 1: one row above the box (when t's fraction is below 0.5) and one
    below it, likewise for columns. Cropping from this window (boxes shifted by -y0, -x0) gives the
    same pixels as cropping from the whole image; a window starting at floor(t) would make roi_align
    clamp the first samples to the box's own top row instead of blending in the row above.
    """
    top, left, h, w = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).T
    if not len(top):
        return 0, 0, 0, 0
    # One pixel more than the taps need on each side (floor - 1, ceil + 1): float rounding of a
    # sample position can never step outside, and a border the image lacks is clamped away.
    y0, x0 = max(0, int(np.floor(top.min())) - 1), max(0, int(np.floor(left.min())) - 1)
    y1 = min(height, int(np.ceil((top + h).max())) + 1)
    x1 = min(width, int(np.ceil((left + w).max())) + 1)
    return y0, y1, x0, x1


def crop_resize_uint8(images: torch.Tensor, boxes: np.ndarray | torch.Tensor, size: int,
                      index: np.ndarray | None = None) -> torch.Tensor:
    """CPU path: (N, 3, H, W) uint8 -> (B, 3, S, S) uint8 (NHWC in memory), one antialiased bilinear
    resize per box; fastest when `images` are NHWC in memory too (no conversion either way).

    torch's uint8 antialias kernel (the one torchvision's Resize uses; it follows PIL) is ~8x
    faster on a CPU core than roi_align on floats. Boxes are rounded to whole pixels. Box i crops
    image `index[i]` (default i), so a resident store is read in place, without a gather.
    """
    b = len(boxes) if index is None else len(index)
    rows = range(b) if index is None else np.asarray(index).tolist()
    box = whole_pixel_boxes(boxes, b)
    # NHWC in memory (channels_last), as the kernel computes it: from a channels_last crop no layout
    # conversion at all (169 us per 224 px crop of a 256 px image, 689 from and to NCHW)
    out = torch.empty((b, size, size, images.shape[1]), dtype=torch.uint8).permute(0, 3, 1, 2)
    for i, (r, one) in enumerate(zip(rows, box, strict=True)):
        crop_into(images, r, one, out[i:i + 1])
    return out


def whole_pixel_boxes(boxes: np.ndarray | torch.Tensor, n: int) -> list[list[int]]:
    """(n, 4) top/left/height/width boxes rounded to whole pixels, as `crop_into` takes them."""
    return np.rint(np.asarray(boxes, dtype=np.float64).reshape(n, 4)).astype(np.int64).tolist()


def crop_into(images: torch.Tensor, row: int, box: list[int], out: torch.Tensor) -> None:
    """Resize whole-pixel box (top, left, height, width) of images[row] into `out`, (1, 3, S, S) uint8
    (NHWC in memory, as `crop_resize_uint8` lays out its batch): torch's uint8 antialias bilinear kernel,
    the op F.interpolate(mode="bilinear", antialias=True) calls, without its Python checks (~30 us)
    or a temporary output."""
    top, left, h, w = box
    crop = images[row:row + 1, :, top:top + max(h, 1), left:left + max(w, 1)]
    torch._C._nn._upsample_bilinear2d_aa(crop, tuple(out.shape[-2:]), False, out=out)


def _select(mask: np.ndarray, device: torch.device) -> torch.Tensor | None:
    rows = np.flatnonzero(mask)
    return torch.as_tensor(rows, device=device) if rows.size else None


def flip_rot_batch(x: torch.Tensor, params: AugParams) -> torch.Tensor:
    """Per-sample horizontal flip, vertical flip, then k quarter turns (square images); in place."""
    if (idx := _select(params.hflip, x.device)) is not None:
        x[idx] = x[idx].flip(-1)
    if (idx := _select(params.vflip, x.device)) is not None:
        x[idx] = x[idx].flip(-2)
    if params.rot90.any() and x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rot90 needs square images, got {tuple(x.shape[-2:])}")
    for k in (1, 2, 3):
        if (idx := _select(params.rot90 == k, x.device)) is not None:
            x[idx] = torch.rot90(x[idx], k, dims=(-2, -1))
    return x


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) ITU-R 601 luma."""
    w = torch.tensor(GREY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def color_jitter_batch(x: torch.Tensor, factors: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation on (B, 3, H, W) float in [0, 255] with (B, 3) factors; in place.

    Pass `factors` as a numpy array or a CPU tensor: only then is it free to tell which steps run.
    """
    # Which steps to run is decided on the host copy: no device sync for a CUDA batch.
    host = factors.detach().cpu().numpy() if isinstance(factors, torch.Tensor) else np.asarray(factors)
    active = (host.reshape(-1, 3) != 1).any(axis=0)
    f = torch.as_tensor(factors, dtype=x.dtype).reshape(-1, 3).to(x.device, non_blocking=True)
    for start in range(0, len(x), _chunk(x)):  # in place on each chunk (views of x)
        end = start + _chunk(x)
        _jitter(x[start:end], f[start:end], active)
    return x


def _chunk(x: torch.Tensor) -> int:
    """Images per pass: a few on the CPU, so that the ~10 passes of jitter/normalize stay in
    cache (3-4x faster per core); the whole batch on CUDA (one kernel per step)."""
    return max(len(x), 1) if x.is_cuda else _CPU_CHUNK


def _jitter(x: torch.Tensor, f: torch.Tensor, active: np.ndarray) -> None:
    if active[0]:
        x.mul_(f[:, 0].view(-1, 1, 1, 1)).clamp_(0, 255)
    if active[1]:  # x = mean + c * (x - mean), mean = the image's mean grey level
        c = f[:, 1].view(-1, 1, 1, 1)
        mean = _grey(x).mean(dim=(-3, -2, -1), keepdim=True)
        x.mul_(c).add_(mean * (1 - c)).clamp_(0, 255)
    if active[2]:  # x = grey + s * (x - grey), per pixel
        s_ = f[:, 2].view(-1, 1, 1, 1)
        grey = _grey(x).mul_(1 - s_)
        x.mul_(s_).add_(grey).clamp_(0, 255)


def normalize_batch(x: torch.Tensor, dtype: torch.dtype = torch.float32,
                    channels_last: bool = False, norm: Normalization = IMAGENET) -> torch.Tensor:
    """(B, 3, H, W) values in [0, 255] -> (x - norm.mean) / norm.std as `dtype`."""
    mean = torch.tensor(norm.mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(norm.std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for start in range(0, len(x), _chunk(x)):
        end = start + _chunk(x)
        torch.sub(x[start:end].float(), mean, out=out[start:end]).mul_(inv_std)
    out = out.to(dtype)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def host_batch(x: torch.Tensor, hwc: bool = False) -> torch.Tensor:
    """Geometry-augmented pixels in [0, 255] -> a host-only batch: (B, H, W, 3) uint8, contiguous.

    x: (B, 3, H, W), or (B, H, W, 3) with `hwc`; uint8, or float (rounded, clamped). No colour jitter and
    no normalisation: those run where the batch goes (the GPU). A contiguous uint8 NHWC `x` is returned as is.
    """
    if x.dtype != torch.uint8:
        x = x.round().clamp_(0, 255).to(torch.uint8)
    return (x if hwc else x.permute(0, 2, 3, 1)).contiguous()


def fast_finish(pixels: torch.Tensor, fast: bool | None = None) -> bool:
    """Whether `finish_batch` runs the fused CPU pass (`fast` None: where it can)."""
    if fast is None:
        return pixels.device.type == "cpu" and pixels.dtype == torch.uint8 and fused.ready()
    return bool(fast)


def finish_batch(pixels: torch.Tensor, factors: np.ndarray | torch.Tensor | None, *,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 hwc: bool = False, fast: bool | None = None, norm: Normalization = IMAGENET,
                 flips: tuple[np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
    """uint8 pixels -> (flips,) colour jitter (`factors`, None = none) -> normalised (B, 3, H, W) `dtype`.

    pixels: (B, 3, H, W), or (B, H, W, 3) with `hwc`. On the CPU with numba this is one fused pass
    (`loaders.fused`); otherwise (CUDA, or `fast=False`) the tensor ops `color_jitter_batch` and
    `normalize_batch`. Both compute the same thing (tests/loaders/test_augment.py holds them together).
    flips: per-image (horizontal, vertical) flags applied first, as `flip_rot_batch` does; the fused
    pass writes flipped rows instead of flipping uint8 copies (~110 us per 224 px image and flip).
    dtype HOST_DTYPE (uint8): `host_batch`, the pixels as (B, H, W, 3) uint8, neither jittered nor normalised.
    """
    if flips is not None and (dtype == HOST_DTYPE or not fast_finish(pixels, fast)):  # flip a uint8 copy first
        n = len(pixels)
        planar = (pixels.permute(0, 3, 1, 2) if hwc else pixels).clone()
        pixels = flip_rot_batch(planar, AugParams(np.zeros((n, 4)), np.asarray(flips[0]), np.asarray(flips[1]),
                                                  np.zeros(n, np.int64), np.ones((n, 3), np.float32)))
        hwc, flips = False, None
    if dtype == HOST_DTYPE:
        return host_batch(pixels, hwc=hwc)
    if fast_finish(pixels, fast):
        x = fused.fused_finish(pixels, factors, channels_last_input=hwc, norm=norm, flips=flips,
                               channels_last=channels_last)
        return x if dtype == torch.float32 else x.to(dtype)  # (.to keeps the memory format)
    x = (pixels.permute(0, 3, 1, 2) if hwc else pixels).float()
    if factors is not None:
        x = color_jitter_batch(x, factors)
    return normalize_batch(x, dtype=dtype, channels_last=channels_last, norm=norm)


def finish_crops(x: torch.Tensor, params: AugParams, *, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, norm: Normalization = IMAGENET) -> torch.Tensor:
    """(B, 3, S, S) uint8 CPU crops (`crop_resize_uint8`'s) -> the batch: flips, rot90, jitter and
    normalisation; one fused pass, the flips in it, where there is one and no quarter turn."""
    if params.rot90.any() or dtype == HOST_DTYPE or not fast_finish(x):  # quarter turns: in uint8 first
        return finish_batch(flip_rot_batch(x, params), params.jitter, dtype=dtype, channels_last=channels_last,
                            norm=norm)
    return finish_batch(x, params.jitter, dtype=dtype, channels_last=channels_last, norm=norm,
                        flips=(params.hflip, params.vflip))


def augment_batch(images: torch.Tensor, params: AugParams, size: int, *, dtype: torch.dtype = torch.float32,
                  channels_last: bool = False, index: np.ndarray | None = None,
                  kernel: str = "auto", norm: Normalization = IMAGENET) -> torch.Tensor:
    """Everything for a batch of (possibly padded) uint8 images: (B, 3, H, W) -> (B, 3, S, S).

    `index`: box i applies to images[index[i]] (a resident store; read in place on the CPU path).
    `kernel`: the crop-resize kernel (see `use_interpolate`).
    dtype HOST_DTYPE (uint8): the geometry only, as (B, S, S, 3) uint8 (`host_batch`).
    """
    if use_interpolate(images, kernel):
        x = crop_resize_uint8(images, params.boxes, size, index)
        return finish_crops(x, params, dtype=dtype, channels_last=channels_last, norm=norm)
    if index is not None:
        images = images[torch.as_tensor(index, device=images.device)]
    x = flip_rot_batch(crop_resize_batch(images, params.boxes, size, kernel="roi_align"), params)
    if dtype == HOST_DTYPE:
        return host_batch(x)
    x = color_jitter_batch(x, params.jitter)
    return normalize_batch(x, dtype=dtype, channels_last=channels_last, norm=norm)


def value_range(norm: Normalization = IMAGENET) -> tuple[float, float]:
    """The smallest and largest value a normalised image can hold (for contract checks)."""
    lo = min((0.0 - m) / s for m, s in zip(norm.mean, norm.std, strict=True))
    hi = max((255.0 - m) / s for m, s in zip(norm.mean, norm.std, strict=True))
    return lo, hi
