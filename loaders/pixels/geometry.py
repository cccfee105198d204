"""The geometry of whole batches of uint8 tensors, on CPU or CUDA: crop-resize, flips, quarter turns.

The definition (order, filters) is in `loaders.pixels.augment`'s docstring; these are its batch form.
"""

from __future__ import annotations

import numpy as np
import torch

from cornpipe.loaders.base import to_device
from cornpipe.loaders.pixels.params import AugParams

CROP_KERNELS: tuple[str, ...] = ("auto", "interpolate", "roi_align")
_CHUNK_BYTES = 512 * 2**20  # float32 working set of one crop_resize_batch chunk


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
    rois = to_device(rois, images.device)  # one non-blocking copy of the batch's boxes
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

    torch's uint8 antialias kernel (the one torchvision's Resize uses; it follows PIL) is several
    times faster on a CPU core than roi_align on floats (docs/loaders.md). Boxes are rounded to whole pixels. Box i crops
    image `index[i]` (default i), so a resident store is read in place, without a gather.
    """
    b = len(boxes) if index is None else len(index)
    rows = range(b) if index is None else np.asarray(index).tolist()
    box = whole_pixel_boxes(boxes, b)
    # NHWC in memory (channels_last), as the kernel computes it: from a channels_last crop no layout
    # conversion at all (from and to NCHW costs four times as much, docs/loaders.md)
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
    the op F.interpolate(mode="bilinear", antialias=True) calls, without its Python checks
    or a temporary output."""
    top, left, h, w = box
    crop = images[row:row + 1, :, top:top + max(h, 1), left:left + max(w, 1)]
    torch._C._nn._upsample_bilinear2d_aa(crop, tuple(out.shape[-2:]), False, out=out)


def _select(mask: np.ndarray, device: torch.device) -> torch.Tensor | None:
    rows = np.flatnonzero(mask)
    return to_device(rows, device) if rows.size else None


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
