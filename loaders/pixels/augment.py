"""Train-time augmentation and the deterministic validation transform, shared by every backend.

One parameter sampler (`loaders.pixels.params.sample_params`), two ways to apply its draws:

- per sample on PIL images (`apply_geometry_pil`, here), used in torch DataLoader workers and by predict;
- on whole batches of uint8 tensors, on CPU or CUDA (`augment_batch`, here): the geometry
  (`loaders.pixels.geometry`), then the finish step, colour jitter + normalisation
  (`loaders.pixels.finish`; one fused numba pass on the CPU), used by the resident backend and, after
  the geometry, by the torch backend.
- host-only batches (dtype uint8, `finish.host_batch`) stop after the geometry: (B, S, S, 3) uint8
  crops, the jitter and normalisation left to the GPU they are fed to.

Order of operations, the same everywhere: random resized crop -> horizontal flip -> vertical flip
-> rot90 -> brightness -> contrast -> saturation -> normalize with the run's statistics (the
trunk's own `loaders.base.Normalization`, passed down from the run; never a default).

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

import numpy as np
import torch
from PIL import Image

from cornpipe.loaders.base import HOST_DTYPE, Normalization, to_device
from cornpipe.loaders.pixels.finish import color_jitter_batch, finish_crops, host_batch, normalize_batch
from cornpipe.loaders.pixels.geometry import (
    crop_resize_batch,
    crop_resize_uint8,
    flip_rot_batch,
    use_interpolate,
)
from cornpipe.loaders.pixels.params import AugParams, val_params

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


def val_preprocess(image: Image.Image, image_size: int, crop_fraction: float,
                   norm: Normalization) -> torch.Tensor:
    """What predict feeds the model: (3, S, S) float32, normalised like every loader's output."""
    pixels = pil_to_tensor(val_transform(image, image_size, crop_fraction))[None].float()
    return normalize_batch(pixels, dtype=torch.float32, norm=norm)[0]


# ---------------------------------------------------------------------------------------------
# whole batches, torch tensors on any device


def augment_batch(images: torch.Tensor, params: AugParams, size: int, *, dtype: torch.dtype = torch.float32,
                  channels_last: bool = False, index: np.ndarray | None = None,
                  kernel: str = "auto", norm: Normalization) -> torch.Tensor:
    """Everything for a batch of (possibly padded) uint8 images: (B, 3, H, W) -> (B, 3, S, S).

    `index`: box i applies to images[index[i]] (a resident store; read in place on the CPU path).
    `kernel`: the crop-resize kernel (see `geometry.use_interpolate`).
    dtype HOST_DTYPE (uint8): the geometry only, as (B, S, S, 3) uint8 (`host_batch`).
    """
    if use_interpolate(images, kernel):
        x = crop_resize_uint8(images, params.boxes, size, index)
        return finish_crops(x, params, dtype=dtype, channels_last=channels_last, norm=norm)
    if index is not None:
        images = images[to_device(index, images.device)]
    x = flip_rot_batch(crop_resize_batch(images, params.boxes, size, kernel="roi_align"), params)
    if dtype == HOST_DTYPE:
        return host_batch(x)
    x = color_jitter_batch(x, params.jitter)
    return normalize_batch(x, dtype=dtype, channels_last=channels_last, norm=norm)
