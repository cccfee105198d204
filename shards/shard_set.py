"""Read a shard set written by `cornpipe convert` (layout: shards/fields.py).

`ShardSet` is what every loader backend, `inspect` and `verify` start from: the validated manifest,
labels in row order, the paths of the .beton (when written: `has_beton`) and the tar/idx pairs, and
random access to one sample's JPEG through the DALI index. `BetonFile` reads a .beton without an FFCV Loader (no numba JIT): labels
from its metadata table and each image's stored bytes, for checks and tests.
"""

from __future__ import annotations

import io
import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from cornpipe.errors import LoaderError, MissingDependency, install_hint
from cornpipe.shards import fields as F
from cornpipe.shards.files import NotRegularFile, check_not_special, open_regular, read_regular_text

REQUIRED_KEYS: tuple[str, ...] = ("format_version", "positions", "sources", "grade_scale", "params",
                                  "splits", "counts", "samples", "files")


def parse_dali_index(path: Path | str) -> list[dict[str, tuple[int, int]]]:
    """A DALI webdataset index (wds2idx v1.2) -> per sample {ext: (offset, size)} in tar order."""
    path = Path(path)
    try:
        text = read_regular_text(path)
    except FileNotFoundError as exc:
        raise LoaderError(f"index file {path} is missing") from exc
    except NotRegularFile as exc:
        raise LoaderError(f"index file {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise LoaderError(f"index file {path} is unreadable ({exc})") from exc
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit():
        raise LoaderError(f"index file {path} is corrupt (expected a 'v1.2 <count>' first line)")
    count = int(head[1])
    body = [ln for ln in lines[1:] if ln.strip()]
    if len(body) != count:
        raise LoaderError(f"index file {path} is corrupt (header says {count} samples, found {len(body)})")
    samples = []
    for n, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) % 4 or not parts:
            raise LoaderError(f"index file {path} is corrupt (line {n})")
        entry = {}
        for i in range(0, len(parts), 4):
            ext, offset, size = parts[i], parts[i + 1], parts[i + 2]
            if not (offset.isdigit() and size.isdigit()):
                raise LoaderError(f"index file {path} is corrupt (line {n})")
            entry[ext] = (int(offset), int(size))
        samples.append(entry)
    return samples


def _check_kind(path: Path, what: str) -> None:
    """LoaderError `<what><path> is not a regular file (<kind>)` for a pipe, folder or device."""
    try:
        check_not_special(path)
    except NotRegularFile as exc:
        raise LoaderError(f"{what}{exc}") from exc


class ShardSet:
    """A converted shard set on disk; raises LoaderError (one line, naming the file) when unusable."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        path = self.root / F.MANIFEST
        if not self.root.is_dir():
            raise LoaderError(f"{self.root} is not a folder (expected a shard set from cornpipe convert)")
        try:
            manifest = json.loads(read_regular_text(path))
        except NotRegularFile as exc:
            raise LoaderError(str(exc)) from exc
        except FileNotFoundError as exc:
            raise LoaderError(f"{path} is missing: {self.root} is not a shard set (run cornpipe convert)") from exc
        except json.JSONDecodeError as exc:
            raise LoaderError(f"{path} is corrupt (invalid JSON at line {exc.lineno})") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise LoaderError(f"{path} is unreadable ({exc})") from exc
        if not isinstance(manifest, dict):
            raise LoaderError(f"{path} is corrupt (not a JSON object)")
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise LoaderError(f"{path} is corrupt (missing {', '.join(missing)})")
        if manifest["format_version"] not in F.READ_FORMAT_VERSIONS:
            raise LoaderError(f"{path} has format version {manifest['format_version']}; this cornpipe reads "
                              f"version {', '.join(map(str, F.READ_FORMAT_VERSIONS))} (convert again)")
        self.manifest: dict = manifest
        self.positions: list[str] = list(manifest["positions"])
        self.sources: list[str] = list(manifest["sources"])
        self.grade_scale: list[float] = [float(g) for g in manifest["grade_scale"]]
        self._index_cache: dict[Path, list[dict[str, tuple[int, int]]]] = {}
        formats = manifest["params"].get("formats", F.FORMATS) if isinstance(manifest["params"], dict) else None
        if not isinstance(formats, list | tuple) or not set(formats) <= set(F.FORMATS) or "wds" not in formats:
            raise LoaderError(f"{path} is corrupt (params.formats is {formats!r}, expected a list of "
                              f"{', '.join(F.FORMATS)} holding wds)")
        self.formats: tuple[str, ...] = tuple(f for f in F.FORMATS if f in formats)
        for split, entry in manifest["splits"].items():
            rows = self.samples(split)
            if len(rows) != entry.get("count") or [s["row"] for s in rows] != list(range(len(rows))):
                raise LoaderError(f"{path} is corrupt (split {split} rows do not match its count)")
            if bool(entry.get("beton")) != self.has_beton:
                raise LoaderError(f"{path} is corrupt (split {split} .beton entry does not match "
                                  f"params.formats {','.join(self.formats)})")

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.count(s)}" for s in self.splits)
        return f"ShardSet({str(self.root)!r}, {counts})"

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def params(self) -> dict:
        return self.manifest["params"]

    def _split(self, split: str) -> dict:
        try:
            return self.manifest["splits"][split]
        except KeyError:
            raise LoaderError(f"unknown split '{split}' (this shard set has: {', '.join(self.splits)})") from None

    def metadata_keys(self) -> list[str]:
        """The manifest CSV's extra columns kept per sample ([] for the folder layout and older sets)."""
        return list(self.manifest.get("metadata", []))

    sample_value = staticmethod(F.sample_value)

    def count(self, split: str) -> int:
        return int(self._split(split)["count"])

    @cached_property
    def _by_split(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {s: [] for s in self.manifest["splits"]}
        for s in self.manifest["samples"]:
            out.setdefault(s["split"], []).append(s)
        for rows in out.values():
            rows.sort(key=lambda s: s["row"])
        return out

    def samples(self, split: str) -> list[dict]:
        """The manifest's sample dicts of this split in row order."""
        self._split(split)
        return self._by_split.get(split, [])

    def labels(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position int64[N], grade float32[N], sample_id int64[N]) in row order."""
        rows = self.samples(split)
        position = np.array([s["position"] for s in rows], dtype=np.int64)
        grade = np.array([s["grade"] for s in rows], dtype=np.float32)
        sample_id = np.array([s["id"] for s in rows], dtype=np.int64)
        return position, grade, sample_id

    @property
    def has_beton(self) -> bool:
        """Whether convert wrote .beton files (the ffcv backend's input); manifests without
        params.formats predate the option and hold both formats."""
        return "beton" in self.formats

    def beton_path(self, split: str, check: bool = True) -> Path:
        """The .beton of a split; with `check`, LoaderError when it is a named pipe, folder or device
        (a reader would block on it or fail deep inside its library)."""
        entry = self._split(split)
        if not self.has_beton:
            raise LoaderError(f"{self.root} has no .beton files (converted with --formats wds); reconvert "
                              f"with --formats beton,wds for the ffcv backend")
        path = self.root / entry["beton"]
        if check:
            _check_kind(path, "")
        return path

    def shards(self, split: str, check: bool = True) -> list[tuple[Path, Path]]:
        """(tar, idx) paths of this split, in row order. Every backend gets its paths here: with `check`,
        LoaderError when one is a named pipe, folder or device (opening a pipe would block)."""
        pairs = [(self.root / e["tar"], self.root / e["index"]) for e in self._split(split)["shards"]]
        for tar, idx in pairs if check else ():
            _check_kind(tar, "shard ")
            _check_kind(idx, "index file ")
        return pairs

    def index(self, idx_path: Path) -> list[dict[str, tuple[int, int]]]:
        """Parsed DALI index (cached)."""
        if idx_path not in self._index_cache:
            self._index_cache[idx_path] = parse_dali_index(idx_path)
        return self._index_cache[idx_path]

    def locate(self, split: str, row: int) -> tuple[Path, Path, int]:
        """(tar, idx, position within that shard) of a row."""
        n = self.count(split)
        if not 0 <= row < n:
            raise LoaderError(f"row {row} is out of range for split {split} ({n} samples)")
        for entry in self._split(split)["shards"]:
            if row < entry["count"]:
                return self.root / entry["tar"], self.root / entry["index"], row
            row -= entry["count"]
        raise LoaderError(f"{self.root / F.MANIFEST} is corrupt (shard counts of {split} do not add up)")

    def read_member(self, split: str, row: int, ext: str) -> bytes:
        """The bytes of one member (`jpg`, `position`, ...) of a sample, via the DALI index + pread.

        `ext` may list alternatives as DALI's reader does, "a;b": the first the sample has
        (F.TAR_ID_EXT reads `.sample_id`, or `.id` in a format version 1 set)."""
        tar, idx, k = self.locate(split, row)
        entries = self.index(idx)
        found = next((e for e in ext.split(";") if k < len(entries) and e in entries[k]), None)
        if found is None:
            raise LoaderError(f"index file {idx} is corrupt (no '{ext}' for sample {k})")
        offset, size = entries[k][found]
        try:  # never blocks: a shard swapped for a pipe or a folder mid-run is one LoaderError naming it
            with open_regular(tar) as f:
                data = os.pread(f.fileno(), size, offset)
        except FileNotFoundError as exc:
            raise LoaderError(f"shard {tar} is missing") from exc
        except NotRegularFile as exc:
            raise LoaderError(f"shard {exc}") from exc
        except OSError as exc:
            raise LoaderError(f"shard {tar} is unreadable ({exc.strerror or exc})") from exc
        if len(data) != size:
            raise LoaderError(f"shard {tar} is truncated (sample {k} ends past the end of the file)")
        return data

    def read_image_bytes(self, split: str, row: int) -> bytes:
        """The stored JPEG of a row, read from its tar shard at the index's offset."""
        return self.read_member(split, row, F.TAR_IMAGE_EXT)


class BetonFile:
    """A .beton read directly (ffcv.reader.Reader + pread): labels and stored image bytes, no Loader."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            from ffcv.reader import Reader
        except ImportError as exc:
            raise MissingDependency(f"reading .beton files needs FFCV: {install_hint('ffcv')}") from exc
        _check_kind(self.path, "")
        if not self.path.is_file():
            raise LoaderError(f"{self.path} is missing")
        try:
            reader = Reader(str(self.path))
        except Exception as exc:  # numpy/ffcv raise assorted errors for a damaged header
            raise LoaderError(f"{self.path} is corrupt ({type(exc).__name__}: {exc})") from exc
        self.num_samples = int(reader.num_samples)
        self.field_names: list[str] = list(reader.field_names)
        self._metadata = reader.metadata
        self._sizes = {int(ptr): int(size) for ptr, size in zip(reader.alloc_table["ptr"],
                                                                reader.alloc_table["size"], strict=True)}
        if len(self._metadata) != self.num_samples:
            raise LoaderError(f"{self.path} is truncated (metadata for {len(self._metadata)} of "
                              f"{self.num_samples} samples)")

    def __len__(self) -> int:
        return self.num_samples

    def column(self, name: str) -> np.ndarray:
        """A scalar field (position, grade, sample_id, source_id) for every row."""
        if name not in self.field_names:
            raise LoaderError(f"{self.path} has no field '{name}' (fields: {', '.join(self.field_names)})")
        return np.array(self._metadata[f"f{self.field_names.index(name)}"])

    def image_record(self, row: int) -> tuple[str, int, int, bytes]:
        """(mode 'jpg'|'raw', height, width, stored bytes) of one row's image."""
        meta = self._metadata[f"f{self.field_names.index(F.IMAGE)}"][row]
        ptr = int(meta["data_ptr"])
        size = self._sizes.get(ptr)
        if size is None:
            raise LoaderError(f"{self.path} is corrupt (row {row} points outside its allocation table)")
        try:
            with open_regular(self.path) as f:
                data = os.pread(f.fileno(), size, ptr)
        except NotRegularFile as exc:
            raise LoaderError(str(exc)) from exc
        if len(data) != size:
            raise LoaderError(f"{self.path} is truncated (row {row})")
        return ("jpg" if int(meta["mode"]) == 0 else "raw"), int(meta["height"]), int(meta["width"]), data

    def image(self, row: int) -> np.ndarray:
        """One row's image decoded to (H, W, 3) uint8 RGB."""
        mode, h, w, data = self.image_record(row)
        if mode == "raw":
            if len(data) != h * w * 3:
                raise LoaderError(f"{self.path} is corrupt (row {row}: {len(data)} bytes for {w}x{h} raw pixels)")
            return np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3).copy()
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                out = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except Exception as exc:
            raise LoaderError(f"{self.path} is damaged (row {row} does not decode: {exc})") from exc
        if out.shape != (h, w, 3):
            raise LoaderError(f"{self.path} is corrupt (row {row} decodes to {out.shape}, expected {(h, w, 3)})")
        return out
