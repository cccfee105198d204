"""The `resident` backend's one-time decode: every image of a split into one padded uint8 store.

On CUDA the JPEGs go to nvJPEG in batches (`torchvision.io.decode_jpeg` with a list and a CUDA
device): the pixels are decoded on the GPU and never cross PCIe. Four-component JPEGs (CMYK, YCCK)
are not offered: where nvJPEG takes them at all its colour conversion need not be PIL's, and every
backend must see the same pixels. nvJPEG refuses some other files that PIL reads (some progressive or
unusual sampling), and decode_jpeg returns nothing for a batch when one image fails, so a refused
batch is retried image by image and what nvJPEG still refuses, or decodes to another size than its
header says, is decoded on the CPU (PIL) like every other backend.
Without nvJPEG (a torchvision built without it, no GPU) everything is decoded on the CPU.

`decode_images` takes the batched decoder as an argument, so the batching and fallback logic runs in
tests on the CPU with a decoder that refuses chosen images.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

DecodeBatch = Callable[[list[torch.Tensor]], list[torch.Tensor]]  # JPEG byte tensors -> (3, h, w) uint8 each
DecodeOne = Callable[[int, bytes], torch.Tensor]  # (split row, blob) -> (3, h, w) uint8 on the CPU
JPEG_MAGIC = b"\xff\xd8\xff"


def jpeg_components(blob: bytes) -> int | None:
    """The colour components of a JPEG (1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK) from its frame header;
    None for anything else or a header this walk cannot follow."""
    if blob[:3] != JPEG_MAGIC:
        return None
    i = 2
    while i + 4 <= len(blob):
        if blob[i] != 0xFF:
            return None
        marker = blob[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        length = int.from_bytes(blob[i + 2:i + 4], "big")
        # SOF0..SOF15 but DHT (C4), JPG (C8), DAC (CC): length(2) precision(1) height(2) width(2) Nf(1)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return blob[i + 9] if i + 9 < len(blob) else None
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def _probe_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 30)).save(buf, "JPEG")
    return buf.getvalue()


def batch_decoder(device: torch.device) -> DecodeBatch | None:
    """nvJPEG batches on `device` when it is a CUDA device and nvJPEG decodes a probe there; else None
    (decode on the CPU). A CUDA device without a working nvJPEG warns once, here."""
    if device.type != "cuda":
        return None
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(data: list[torch.Tensor]) -> list[torch.Tensor]:
        # RGB: a greyscale JPEG comes back with 3 channels, as PIL's convert("RGB") gives it
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    try:
        decode([_as_tensor(_probe_jpeg())])
    except Exception as exc:  # built without nvJPEG, no driver: the CPU decode still works
        warnings.warn(f"resident backend: nvJPEG cannot decode on {device} ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); decoding on the CPU",
                      RuntimeWarning, stacklevel=2)
        return None
    return decode


def _as_tensor(blob: bytes) -> torch.Tensor:
    # bytearray: a writable copy (torch.frombuffer warns on read-only bytes); decode_jpeg wants CPU uint8
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def _try_batch(decode_batch: DecodeBatch, blobs: Sequence[bytes]) -> list[torch.Tensor | None]:
    """decode_batch over `blobs`; when the batch fails, each image alone; None where it still fails."""
    if not blobs:
        return []
    try:
        return list(decode_batch([_as_tensor(b) for b in blobs]))
    except Exception:  # nvJPEG's refusals are RuntimeErrors of many wordings
        if len(blobs) == 1:
            return [None]
    out: list[torch.Tensor | None] = []
    for blob in blobs:
        try:
            out.append(decode_batch([_as_tensor(blob)])[0])
        except Exception:  # this one image goes to the CPU decoder
            out.append(None)
    return out


def decode_images(rows: Sequence[int], blobs: Sequence[bytes], sizes: np.ndarray, decode_one: DecodeOne,
                  decode_batch: DecodeBatch | None = None,
                  map_fn: Callable[..., Iterable[torch.Tensor]] = map) -> list[torch.Tensor]:
    """Decode `blobs` (the images of split `rows`, header sizes (N, 2) height/width) -> (3, h, w) uint8
    each, in order: grey and colour JPEGs through `decode_batch` (on its device), the rest and every
    refusal through `decode_one` (CPU; `map_fn` may run it on threads). `decode_one` raises for a
    corrupt image."""
    out: list[torch.Tensor | None] = [None] * len(blobs)
    if decode_batch is not None:
        jpegs = [i for i, blob in enumerate(blobs) if jpeg_components(blob) in (1, 3)]
        for i, image in zip(jpegs, _try_batch(decode_batch, [blobs[i] for i in jpegs]), strict=True):
            # the crop boxes are drawn for the header's size: any other result is not used
            if image is not None and tuple(image.shape) == (3, *(int(v) for v in sizes[i])):
                out[i] = image
    rest = [i for i, image in enumerate(out) if image is None]
    for i, image in zip(rest, map_fn(decode_one, [rows[i] for i in rest], [blobs[i] for i in rest]), strict=True):
        out[i] = image
    return out  # type: ignore[return-value] - every slot is filled by now


def place(slot: torch.Tensor, image: torch.Tensor) -> None:
    """Write a (3, h, w) image top-left into a (3, H, W) store slot (H > h, W > w): its last row and
    column once more (roi_align's bilinear taps at the border read one pixel past the image), zero beyond."""
    _, h, w = image.shape
    slot[:, :h, :w] = image
    slot[:, h, :w] = image[:, h - 1, :]
    slot[:, :h + 1, w] = slot[:, :h + 1, w - 1]
    slot[:, h + 1:, :] = 0
    slot[:, :, w + 1:] = 0


def chunks(n: int, size: int) -> Iterator[range]:
    """range(n) in consecutive ranges of at most `size`."""
    for start in range(0, n, size):
        yield range(start, min(start + size, n))
