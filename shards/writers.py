"""Writers of one split: the FFCV .beton and the webdataset tar shards with their DALI index files.

FFCV is imported only to write a .beton (`--formats beton,wds`); the tar writer needs no FFCV.

Both read the same staged pixels/JPEG bytes that convert's workers produced, so the two formats hold
the same image at the same resolution. In jpg mode the .beton's JPEG bytes equal the tar's: both are
OpenCV encodes of the same pixels with the same quality (`shards.imageio.encode_jpeg`).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from cornpipe.errors import MissingDependency, install_hint
from cornpipe.shards import fields as F

DALI_INDEX_VERSION = "v1.2"  # the format DALI's wds2idx writes and fn.readers.webdataset reads
WRITE_MODES: tuple[str, ...] = ("jpg", "raw", "smart")
SMART_THRESHOLD = 256 * 256 * 3  # smart mode: JPEG when raw pixels exceed this many bytes, else raw
MIN_PAGE_SIZE = 1 << 21  # FFCV's minimum page size (2 MiB)


class Staging:
    """Append-only files holding each prepared image's pixels and tar JPEG, addressed by offset."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.pixels_path = folder / "pixels.u8"
        self.jpeg_path = folder / "jpeg.bin"
        self._pixels = open(self.pixels_path, "wb")
        self._jpeg = open(self.jpeg_path, "wb")

    def add(self, pixels: np.ndarray, jpeg: bytes) -> tuple[int, int]:
        """Store one image; returns (pixel offset, jpeg offset)."""
        p_off, j_off = self._pixels.tell(), self._jpeg.tell()
        self._pixels.write(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
        self._jpeg.write(jpeg)
        return p_off, j_off

    def close(self) -> None:
        self._pixels.close()
        self._jpeg.close()

    def remove(self) -> None:
        self.close()
        for p in (self.pixels_path, self.jpeg_path):
            p.unlink(missing_ok=True)


@dataclass(frozen=True)
class StagedSample:
    """Everything the writers need about one converted sample."""

    sample_id: int
    position: int
    grade: float
    source_id: int
    height: int
    width: int
    pixel_offset: int
    jpeg_offset: int
    jpeg_size: int
    meta: dict  # the tar's .json member


class StagedImages:
    """Indexable (FFCV-writer style) view of one split's staged samples: row -> field tuple."""

    def __init__(self, pixels_path: Path, samples: Sequence[StagedSample]) -> None:
        self.pixels_path = pixels_path
        self.samples = list(samples)
        self._memmap: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, row: int) -> np.ndarray:
        if self._memmap is None:  # opened lazily: in each FFCV writer process after fork
            self._memmap = np.memmap(self.pixels_path, dtype=np.uint8, mode="r")
        s = self.samples[row]
        n = s.height * s.width * 3
        return np.array(self._memmap[s.pixel_offset:s.pixel_offset + n]).reshape(s.height, s.width, 3)

    def __getitem__(self, row: int) -> tuple:
        s = self.samples[row]
        return (self.pixels(row), s.position, s.grade, s.sample_id, s.source_id)


def _page_size(max_sample_bytes: int) -> int:
    size = MIN_PAGE_SIZE
    while size < 4 * max_sample_bytes + (1 << 16):
        size <<= 1
    return size


@contextmanager
def _quiet_tqdm(writer_module) -> Iterator[None]:
    """FFCV's writer draws its own tqdm bar on stderr; convert has its own progress display."""
    original = writer_module.tqdm
    writer_module.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        writer_module.tqdm = original


NO_FFCV = (f"writing .beton files needs FFCV: {install_hint('ffcv')}, or convert with --formats wds "
           "(tar shards only, enough for the torch, resident and dali backends)")


def require_ffcv() -> None:
    """Import FFCV's writer now (slow: numba) or say which package is missing."""
    try:
        import ffcv.fields  # noqa: F401
        import ffcv.writer  # noqa: F401
    except ImportError as exc:
        raise MissingDependency(NO_FFCV) from exc


def write_beton(path: Path, staged: StagedImages, *, write_mode: str, jpeg_quality: int,
                smart_threshold: int = SMART_THRESHOLD, workers: int = 1) -> None:
    """Write one split's .beton with FFCV's own DatasetWriter (fields as in shards.fields)."""
    try:
        import ffcv.writer as ffcv_writer
        from ffcv.fields import FloatField, IntField, RGBImageField
        from ffcv.writer import DatasetWriter
    except ImportError as exc:
        raise MissingDependency(NO_FFCV) from exc
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode must be one of {WRITE_MODES}")
    max_bytes = max(s.height * s.width * 3 for s in staged.samples)
    chunk = max(1, min(100, -(-len(staged) // max(1, workers))))
    n_workers = max(1, min(workers, -(-len(staged) // chunk)))
    writer = DatasetWriter(
        str(path),
        {
            F.IMAGE: RGBImageField(write_mode=write_mode, max_resolution=None,
                                   smart_threshold=smart_threshold, jpeg_quality=jpeg_quality),
            F.POSITION: IntField(),
            F.GRADE: FloatField(),
            F.SAMPLE_ID: IntField(),
            F.SOURCE_ID: IntField(),
        },
        page_size=_page_size(max_bytes),
        num_workers=n_workers,
    )
    with _quiet_tqdm(ffcv_writer):
        writer.from_indexed_dataset(staged, chunksize=chunk)


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


def sample_members(s: StagedSample, jpeg: bytes) -> list[tuple[str, bytes]]:
    """The members of one sample in the order they are written: (ext, bytes)."""
    return [
        (F.TAR_IMAGE_EXT, jpeg),
        (F.TAR_POSITION_EXT, np.int64(s.position).astype("<i8").tobytes()),
        (F.TAR_GRADE_EXT, np.float32(s.grade).astype("<f4").tobytes()),
        (F.TAR_ID_EXT, np.int64(s.sample_id).astype("<i8").tobytes()),
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
