"""What an image goes through before a trained model sees it at inference (predict, evaluate's peers, explain).

Exactly what a validation image went through: convert's decode (EXIF orientation, RGB repairs) and resize of
the longest side to the shard set's max_resolution, its JPEG encoding at the same quality, then the loaders'
validation transform (resize + centre crop to the run's image size, normalise). A JPEG already stored in the
shard set skips the first two steps (stored_for_inference).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cornpipe.errors import CornpipeError
from cornpipe.loaders.base import AugmentConfig, Normalization
from cornpipe.loaders.pixels.augment import val_preprocess
from cornpipe.shards.files import read_regular_bytes
from cornpipe.shards.imageio import encode_jpeg, prepare_image, resize_longest, upright_rgb


def load_for_inference(path: Path, convert_params: dict, image_size: int, norm: Normalization) -> torch.Tensor:
    """One image file -> (3, S, S) float32, normalised as in training; ImageRejected/OSError when unreadable."""
    prepared = prepare_image(read_regular_bytes(path), max_resolution=int(convert_params["max_resolution"]))
    return _as_stored(prepared.pixels, convert_params, image_size, norm)


def pixels_for_inference(image: Image.Image | np.ndarray, convert_params: dict, image_size: int,
                         norm: Normalization) -> torch.Tensor:
    """An in-memory PIL image or HxWx3 uint8 array -> what load_for_inference gives for its file."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise CornpipeError(f"an image array must be HxWx3 uint8 RGB (got shape {image.shape}, {image.dtype})")
        image = Image.fromarray(image, "RGB")
    else:
        image = upright_rgb(image)
    resized = resize_longest(image, int(convert_params["max_resolution"]))
    return _as_stored(np.ascontiguousarray(np.asarray(resized, dtype=np.uint8)), convert_params, image_size, norm)


def stored_for_inference(jpeg: bytes, image_size: int, norm: Normalization) -> torch.Tensor:
    """A JPEG as the shard set stores it -> what the validation loader gives the model for it."""
    with Image.open(io.BytesIO(jpeg)) as image:
        return val_preprocess(image.convert("RGB"), image_size, AugmentConfig().val_crop_fraction, norm)


def _as_stored(pixels: np.ndarray, convert_params: dict, image_size: int, norm: Normalization) -> torch.Tensor:
    return stored_for_inference(encode_jpeg(pixels, int(convert_params["jpeg_quality"])), image_size, norm)
