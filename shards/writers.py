"""Writers of one split: the FFCV .beton and the webdataset tar shards with their DALI index files.

FFCV is imported only to write a .beton (`--formats beton,wds`); the tar writer needs no FFCV.

Both read the same staged JPEG bytes (and, for raw .beton images, pixels) that convert's workers
produced (shards/staging.py), so the two formats hold the same image at the same resolution; in jpg
mode the .beton's JPEG bytes are the tar's.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

import numpy as np

from cornpipe.errors import MissingDependency, install_hint
from cornpipe.shards import fields as F
from cornpipe.shards.staging import StagedSample, Staging

DALI_INDEX_VERSION = "v1.2"  # the format DALI's wds2idx writes and fn.readers.webdataset reads
WRITE_MODES: tuple[str, ...] = F.WRITE_MODES  # in fields, so the CLI's --help needs no numpy
SMART_THRESHOLD = 256 * 256 * 3  # smart mode: JPEG when raw pixels exceed this many bytes, else raw
MIN_PAGE_SIZE = 1 << 21  # FFCV's minimum page size (2 MiB)


def page_size(max_sample_bytes: int) -> int:
    size = MIN_PAGE_SIZE
    while size < 4 * max_sample_bytes + (1 << 16):
        size <<= 1
    return size


NO_FFCV = (f"writing .beton files needs FFCV: {install_hint('ffcv')}, or convert with --formats wds "
           "(tar shards only, enough for the torch, resident and dali backends)")


def require_ffcv() -> None:
    """Import FFCV's writer now (slow: numba) or say which package is missing."""
    try:
        import ffcv.fields  # noqa: F401
        import ffcv.writer  # noqa: F401
    except ImportError as exc:
        raise MissingDependency(NO_FFCV) from exc


def write_beton(path: Path, samples: Sequence[StagedSample], staging: Staging, *, write_mode: str,
                jpeg_quality: int, smart_threshold: int = SMART_THRESHOLD) -> None:
    """Write one split's .beton in FFCV's format (fields as in shards.fields), in this process.

    FFCV's DatasetWriter is used for the header, the metadata table and its page allocator, but its
    worker processes are not: they fill pages in whichever order they finish (different bytes on
    every run), and a worker that dies (a full disk) leaves its parent polling forever. The image
    field is fed the staged bytes as they are, so nothing is encoded twice: the JPEG is the tar's,
    which is what FFCV's RGBImageField would write (shards.imageio.encode_jpeg), and raw images are
    the staged pixels. Same input, same bytes; an error is raised here, in convert's process.
    """
    try:
        from ffcv.fields import FloatField, IntField, RGBImageField
        from ffcv.memory_allocator import MemoryAllocator
        from ffcv.writer import DatasetWriter, handle_sample
    except ImportError as exc:
        raise MissingDependency(NO_FFCV) from exc
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode must be one of {WRITE_MODES}")
    fields = {F.IMAGE: RGBImageField(write_mode=write_mode, max_resolution=None,
                                     smart_threshold=smart_threshold, jpeg_quality=jpeg_quality),
              F.POSITION: IntField(), F.GRADE: FloatField(), F.SAMPLE_ID: IntField(), F.SOURCE_ID: IntField()}
    max_bytes = max(s.height * s.width * 3 for s in samples)
    writer = DatasetWriter(str(path), fields, page_size=page_size(max_bytes), num_workers=1)
    writer.num_samples = len(samples)
    writer.prepare()  # header and field descriptors; the metadata table lives in shared memory
    try:
        metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
        encoders = {**fields, F.IMAGE: _StagedImage()}
        allocator = MemoryAllocator(str(path), writer.data_region_start, writer.page_size)
        with open(staging.jpeg_path, "rb") as jpegs, open(staging.pixels_path, "rb") as pixels:
            with allocator:  # pages are written in order as they fill
                for row, s in enumerate(samples):
                    if s.pixel_offset >= 0:
                        image = ("raw", s.height, s.width, os.pread(pixels.fileno(), s.height * s.width * 3,
                                                                    s.pixel_offset))
                    else:
                        image = ("jpg", s.height, s.width, os.pread(jpegs.fileno(), s.jpeg_size, s.jpeg_offset))
                    handle_sample((image, s.position, s.grade, s.sample_id, s.source_id), row,
                                  metadata.dtype.names, metadata, allocator, encoders)
        del metadata  # the shared-memory buffer cannot close while a view of it exists
        writer.finalize(allocator.allocations)
    finally:
        writer.metadata_sm.unlink()
        with suppress(BufferError):  # after an error its traceback may still hold a view: then the
            writer.metadata_sm.close()  # mapping goes with the process; the name is gone already


class _StagedImage:
    """Encodes a staged image into the .beton's RGBImageField layout without re-encoding it."""

    def encode(self, destination: np.ndarray, value: tuple, malloc) -> None:
        from ffcv.fields.rgb_image import IMAGE_MODES

        mode, height, width, data = value
        destination["mode"] = IMAGE_MODES[mode]
        destination["height"], destination["width"] = height, width
        destination["data_ptr"], storage = malloc(len(data))
        storage[:] = np.frombuffer(data, dtype="<u1")


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    """Add one member with fixed metadata (same input, same bytes); returns (data offset, size)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    header = info.tobuf(tar.format, tar.encoding, tar.errors)
    offset = tar.offset + len(header)
    tar.addfile(info, io.BytesIO(data))
    return offset, len(data)


def grade_text(grade: float) -> str:
    """The `.grade.txt` member: a whole grade without a fraction ("5"), else Python's shortest repr ("2.5")."""
    value = float(grade)
    return str(int(value)) if value.is_integer() else repr(value)


def sample_members(s: StagedSample, jpeg: bytes) -> list[tuple[str, bytes]]:
    """The members of one sample in the order they are written: (ext, bytes). Layout: shards/fields.py."""
    return [
        (F.TAR_IMAGE_EXT, jpeg),
        (F.TAR_POSITION_EXT, np.int64(s.position).astype("<i8").tobytes()),  # raw: DALI's typed reader
        (F.TAR_GRADE_EXT, np.float32(s.grade).astype("<f4").tobytes()),
        (F.TAR_SAMPLE_ID_EXT, np.int64(s.sample_id).astype("<i8").tobytes()),
        (F.TAR_CLASS_EXT, str(int(s.position)).encode("ascii")),  # text: the webdataset library's decoders
        (F.TAR_GRADE_TEXT_EXT, grade_text(s.grade).encode("ascii")),
        (F.TAR_META_EXT, json.dumps(s.meta, ensure_ascii=False, sort_keys=True).encode("utf-8")),
    ]


def write_shards(out: Path, split: str, jpeg_path: Path, samples: Sequence[StagedSample],
                 shard_size: int = F.SHARD_SIZE) -> list[dict]:
    """Write `split-NNNNNN.tar` + `.idx` pairs; returns manifest entries {"tar","index","count"}."""
    entries = []
    with open(jpeg_path, "rb") as jpegs:
        for shard, start in enumerate(range(0, len(samples), shard_size)):
            chunk = samples[start:start + shard_size]
            tar_name, idx_name = F.shard_name(split, shard), F.index_name(split, shard)
            lines = []
            with open(out / tar_name, "wb") as raw, \
                    tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for s in chunk:
                    jpeg = os.pread(jpegs.fileno(), s.jpeg_size, s.jpeg_offset)
                    key = F.sample_key(s.sample_id)
                    parts = []
                    for ext, data in sample_members(s, jpeg):
                        name = f"{key}.{ext}"
                        offset, size = _tar_member(tar, name, data)
                        parts.append(f"{ext} {offset} {size} {name}")
                    lines.append(" ".join(parts))
            with open(out / idx_name, "w", encoding="utf-8") as idx:
                idx.write(f"{DALI_INDEX_VERSION} {len(chunk)}\n")
                for line in lines:
                    idx.write(line + "\n")
            entries.append({"tar": tar_name, "index": idx_name, "count": len(chunk)})
    return entries
