"""The batch contract every loader backend honours, and the augmentation parameters they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from cornpipe.choices import (  # noqa: F401  (re-exported: the loaders' names and defaults)
    BACKENDS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_OVERSAMPLE,
    MIN_IMAGE_SIZE,
    OVERSAMPLE_STRATEGIES,
)

# backend name -> the module that builds it (imported only when asked for; see cornpipe.loaders)
BACKEND_MODULES: dict[str, str] = {
    "ffcv": "cornpipe.loaders.backends.ffcv_loader",
    "dali": "cornpipe.loaders.backends.dali_loader",
    "torch": "cornpipe.loaders.backends.torch_loader",
    "resident": "cornpipe.loaders.backends.resident_loader",
}
FOLDER_BACKEND = "torch-folder"  # the torch backend over the original images (the "before" baseline)

# ImageNet statistics on the 0-255 scale; the trunk is trained from scratch but these keep
# activations in a sane range and match what the team's earlier runs used.
MEAN_255: tuple[float, float, float] = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD_255: tuple[float, float, float] = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass(frozen=True)
class Normalization:
    """Per-channel (x - mean) / std of the 0-255 pixels every backend applies last."""

    mean: tuple[float, float, float] = MEAN_255  # 0-255 scale
    std: tuple[float, float, float] = STD_255  # 0-255 scale

    @classmethod
    def from_unit(cls, mean: tuple[float, ...], std: tuple[float, ...]) -> Normalization:
        """From statistics on the 0-1 scale (timm's pretrained_cfg)."""
        return cls(tuple(255.0 * float(m) for m in mean), tuple(255.0 * float(s) for s in std))

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


# What cornpipe's own trunks are trained with; a run passes it (or a pretrained trunk's own) explicitly.
IMAGENET = Normalization()
GREY_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)  # ITU-R 601 luma: contrast and saturation


@dataclass(frozen=True)
class AugmentConfig:
    """Train-time augmentation; every backend applies the same parameters."""

    scale: tuple[float, float] = (0.35, 1.0)  # random resized crop: fraction of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random resized crop: aspect ratio range (w/h)
    hflip: bool = True  # p = 0.5
    vflip: bool = True  # p = 0.5; leaves have no fixed up/down in a hand-held photo
    rot90: bool = False  # random multiples of 90 degrees (aerial imagery has no up)
    brightness: float = 0.2  # multiplicative jitter, factor in [1 - b, 1 + b]
    contrast: float = 0.2  # factor in [1 - c, 1 + c] around the image mean
    saturation: float = 0.2  # factor in [1 - s, 1 + s] around the grey image
    val_crop_fraction: float = 0.875  # validation: resize shorter side to size / fraction, centre crop


# LoaderSpec.dtype for host-only batches: what a host hands a GPU trainer. The images come out as
# (B, S, S, 3) uint8 NHWC, contiguous, on the CPU, after the geometry (crop-resize, flips, rot90) and
# before colour jitter and normalisation, which are the GPU's job (`bench loaders --host-only`).
HOST_DTYPE = torch.uint8


class Batch(NamedTuple):
    """One batch, identical in layout on every backend."""

    # (B, 3, H, W), float16/float32, normalised; channels_last on CUDA. With dtype HOST_DTYPE:
    # (B, H, W, 3) uint8 crops on the CPU, not jittered or normalised.
    images: torch.Tensor
    position: torch.Tensor  # (B,) int64 class index
    grade: torch.Tensor  # (B,) float32 grade value on the dataset's scale
    sample_id: torch.Tensor  # (B,) int64, the manifest's sample id





def to_device(values: object, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (numpy, list, CPU tensor) -> a tensor on `device` without blocking the host:
    on CUDA a pinned copy sent with non_blocking=True (from pageable memory the copy would wait
    for the GPU to finish every step queued before it)."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
