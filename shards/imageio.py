"""Open one input image robustly and normalise it to 8-bit RGB at the stored resolution.

Every function here runs inside convert's worker processes: it never raises for a bad file,
it raises `ImageRejected` with a reason a person understands, which convert writes to
rejected.csv. Decisions (documented in the README's convert section):

- the format is decided by content, not extension (a PNG behind `.jpg` is simply a PNG);
- a JPEG must be complete: PIL's load must succeed with `LOAD_TRUNCATED_IMAGES` off *and* the
  end-of-image marker must be present (libjpeg pads a file cut at the very end silently);
- EXIF orientation is applied (`ImageOps.exif_transpose`);
- transparency is composited onto white (cut-out leaves on a white sheet), not dropped;
- high bit-depth (16-bit, 32-bit int, float) is stretched per image from its min..max to 0..255,
  grey and colour alike, over all bands together so hues keep (survey exports rarely use the full
  16-bit range, so `>> 8` would give near-black images); PIL keeps only the high byte of a 16-bit
  colour PNG, so those are read in full (`_png16_colour`);
- multi-band images take their first three bands as RGB; one band is grey; two bands are rejected;
- resizing uses LANCZOS so the longest side is at most `max_resolution`; images are never upscaled.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cornpipe.shards.fields import DEFAULT_MAX_PIXELS  # there, so the CLI's --help needs no numpy or PIL

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
)
WHITE = (255, 255, 255)
HIGH_BIT_DEPTH_RULE = "stretch: each image's min..max to 0..255, grey and colour alike"  # in manifest params


class ImageRejected(Exception):
    """This input cannot be converted; the message is the rejected.csv reason."""


@dataclass
class PreparedImage:
    """One input decoded, repaired and resized: what convert stores."""

    pixels: np.ndarray  # (H, W, 3) uint8, the stored image
    sha256: str  # of the input file's bytes
    orig_width: int
    orig_height: int
    repairs: list[str] = field(default_factory=list)  # what was changed, for the manifest

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


@contextmanager
def _pixel_limit(max_pixels: int):
    """Let our own check (with our message) enforce the limit, not PIL's warning/2x error."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(int(max_pixels), 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def target_size(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    """(w, h) with the longest side at most max_resolution, aspect kept, never upscaled."""
    longest = max(width, height)
    if longest <= max_resolution:
        return width, height
    scale = max_resolution / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_longest(image: Image.Image, max_resolution: int) -> Image.Image:
    """LANCZOS-resize an RGB image so its longest side is at most max_resolution."""
    size = target_size(image.width, image.height, max_resolution)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)


def _check_jpeg_complete(data: bytes) -> None:
    body = data.rstrip(b"\x00")
    if body.endswith(b"\xff\xd9"):
        return
    # Camera trailers may follow the EOI marker; scan data never contains 0xFFD9 (byte stuffing),
    # so an EOI after the last start-of-scan marker means the image itself is complete.
    last_sos = body.rfind(b"\xff\xda")
    if last_sos >= 0 and body.find(b"\xff\xd9", last_sos) >= 0:
        return
    raise ImageRejected("truncated JPEG (no end-of-image marker)")


def _stretch_to_uint8(array: np.ndarray) -> np.ndarray:
    """Min..max stretch of a high bit-depth array (any shape) to uint8."""
    a = array.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        raise ImageRejected("image has no finite pixel values")
    lo, hi = float(a[finite].min()), float(a[finite].max())
    a = np.where(finite, a, lo)
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.clip(np.rint((a - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _bands_to_rgb(array: np.ndarray, what: str) -> np.ndarray:
    """(H, W) or (H, W, C) of any dtype -> (H, W, 3) uint8, with the rules in the module doc."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ImageRejected(f"cannot make RGB from {what} with shape {array.shape}")
    bands = array.shape[2]
    if bands == 2:
        raise ImageRejected(f"cannot make RGB from a 2-band {what}")
    if bands >= 3:
        array = array[:, :, :3]
    if array.dtype != np.uint8:
        array = _stretch_to_uint8(array)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _is_png16_colour(image: Image.Image) -> bool:
    return image.format == "PNG" and len(image.tile) == 1 and image.tile[0][3] in ("RGB;16B", "RGBA;16B")


def _png16_colour(data: bytes, repairs: list[str]) -> Image.Image:
    """A 16-bit RGB(A) PNG in full, stretched as 16-bit grey is. PIL decodes it to 8 bits by keeping
    each sample's high byte; decoding again with the little-endian unpacker (same filters, same
    sample width) yields the low bytes."""
    planes = []
    for order in ("16B", "16L"):  # high bytes, then low bytes
        with Image.open(io.BytesIO(data)) as image:
            tile = image.tile[0]
            args = tile[3].replace("16B", order)
            image.tile = [tile._replace(args=args) if hasattr(tile, "_replace") else (*tile[:3], args)]
            try:
                image.load()
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise ImageRejected(f"truncated or corrupt image data ({exc})") from exc
            planes.append(np.asarray(image, dtype=np.uint16))
    array = planes[0] << 8 | planes[1]  # (H, W, 3|4)
    rgb = _stretch_to_uint8(array[:, :, :3])
    repairs.append(f"16-bit {'RGBA' if array.shape[2] == 4 else 'RGB'} PNG stretched to 8-bit RGB")
    if array.shape[2] == 3:
        return Image.fromarray(rgb, "RGB")
    alpha = (array[:, :, 3] >> 8).astype(np.uint8)
    return _composite_on_white(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))


def _to_rgb(image: Image.Image, repairs: list[str]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        repairs.append(f"{mode} composited on white")
        return _composite_on_white(image)
    if mode in ("L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        repairs.append(f"{mode} converted to RGB")
        return image.convert("RGB")
    # I;16*, I, F and anything else: go through numpy
    array = np.asarray(image)
    repairs.append(f"{mode} stretched to 8-bit RGB")
    return Image.fromarray(_bands_to_rgb(array, f"{mode} image"), "RGB")


TIFF_MAGIC: tuple[bytes, ...] = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _needs_tifffile(image: Image.Image) -> bool:
    """TIFFs PIL would read lossily: >8 bits per sample in colour (PIL keeps the high byte) or float."""
    tags = getattr(image, "tag_v2", None)
    if image.format != "TIFF" or tags is None:
        return False
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    fmt = tags.get(339, (1,))
    fmt = fmt if isinstance(fmt, tuple) else (fmt,)
    samples = int(tags.get(277, 1) or 1)
    if len(image.getbands()) < min(samples, 3):  # e.g. a planar multi-band file opened as one grey plane
        return True
    return image.mode not in ("I;16", "I;16B", "I;16L", "I", "F") and (max(bits) > 8 or 3 in fmt)


def _open_tiff_array(data: bytes, repairs: list[str]) -> Image.Image:
    """TIFFs PIL cannot read faithfully (multi-band, 16-bit colour, float) through tifffile + numpy."""
    try:
        import tifffile
    except ImportError as exc:
        raise ImageRejected("TIFF layout PIL cannot read (pip install tifffile to convert it)") from exc
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            array = np.asarray(page.asarray())
            axes = page.axes
    except Exception as exc:  # tifffile raises many types for broken or exotic files
        raise ImageRejected(f"unreadable TIFF ({type(exc).__name__}: {exc})") from exc
    if len(axes) == array.ndim:  # drop length-1 axes together with their letters
        axes = "".join(a for a, n in zip(axes, array.shape, strict=True) if n != 1)
    array = np.squeeze(array)
    if array.ndim == 3 and axes.startswith("S"):
        array = np.moveaxis(array, 0, -1)  # planar (C, H, W) -> (H, W, C)
    bands = array.shape[2] if array.ndim == 3 else 1
    repairs.append(f"{bands}-band {array.dtype} TIFF made 8-bit RGB")
    return Image.fromarray(_bands_to_rgb(array, "TIFF"), "RGB")


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               repairs: list[str] | None = None) -> Image.Image:
    """Decode file bytes to a full-resolution, upright RGB image, or raise ImageRejected."""
    repairs = [] if repairs is None else repairs
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    assert not ImageFile.LOAD_TRUNCATED_IMAGES, "truncated images must be rejected, not padded"
    with _pixel_limit(max_pixels):
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageRejected(f"image larger than the --max-pixels limit of {max_pixels} ({exc})") from exc
        except UnidentifiedImageError as exc:
            if data[:4] in TIFF_MAGIC:
                return _check_pixels(_open_tiff_array(data, repairs), max_pixels)
            raise ImageRejected("not an image (content not recognised)") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageRejected(f"truncated or corrupt image header ({exc})") from exc
        pixels = image.width * image.height
        if pixels > max_pixels:
            raise ImageRejected(
                f"{image.width}x{image.height} = {pixels} pixels, above the --max-pixels limit of {max_pixels}"
            )
        if image.format == "JPEG":
            _check_jpeg_complete(data)
        if _needs_tifffile(image):
            return _open_tiff_array(data, repairs)
        if _is_png16_colour(image):
            return _png16_colour(data, repairs)
        try:
            image.load()
        except Image.DecompressionBombError as exc:
            raise ImageRejected(f"image larger than the --max-pixels limit of {max_pixels} ({exc})") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageRejected(f"truncated or corrupt image data ({exc})") from exc
    orientation = _orientation(image)
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose the image
        upright = image
        repairs.append("unreadable EXIF orientation ignored")
    else:
        if orientation not in (0, 1):
            repairs.append(f"EXIF orientation {orientation} applied")
    return _to_rgb(upright, repairs)


def _check_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    if image.width * image.height > max_pixels:
        raise ImageRejected(f"{image.width}x{image.height} = {image.width * image.height} pixels, "
                            f"above the --max-pixels limit of {max_pixels}")
    return image


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


def prepare_image(data: bytes, *, max_resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """File bytes -> the stored image (RGB uint8, longest side <= max_resolution) or ImageRejected."""
    repairs: list[str] = []
    rgb = decode_rgb(data, max_pixels=max_pixels, repairs=repairs)
    orig_w, orig_h = rgb.size
    resized = resize_longest(rgb, max_resolution)
    pixels = np.ascontiguousarray(np.asarray(resized, dtype=np.uint8))
    return PreparedImage(pixels=pixels, sha256=hashlib.sha256(data).hexdigest(),
                         orig_width=orig_w, orig_height=orig_h, repairs=repairs)


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """JPEG-encode (H, W, 3) RGB uint8 exactly as FFCV's RGBImageField does (OpenCV, same flags),
    so the tar shards hold the same bytes as a jpg-mode .beton. Without OpenCV (a bare GPU machine
    converting tar shards only) PIL encodes at the same quality: same pixels within JPEG error."""
    try:
        import cv2
    except ImportError:
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=int(quality))
        return buffer.getvalue()

    bgr = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise ImageRejected("JPEG encoding failed")
    return buf.tobytes()


def decode_jpeg_rgb(data: bytes) -> np.ndarray:
    """Decode stored JPEG bytes to (H, W, 3) RGB uint8 with PIL (used by verify and tests)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def upright_rgb(image: Image.Image) -> Image.Image:
    """An in-memory PIL image as decode_rgb leaves a file's: EXIF orientation applied, 8-bit RGB
    (predict.load_model's images that are not files)."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose the image
        pass
    return _to_rgb(image, [])
