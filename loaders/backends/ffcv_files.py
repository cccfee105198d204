"""The .beton files one `ffcv` loader reads, and FFCV's memory manager stretched over several of them.

A split's loader reads one .beton; a cross-validation fold (`LoaderSpec.sample_ids`) reads rows of
train.beton and val.beton. FFCV's Loader knows one file, so the loader builds it on the first file
and widens it (`widen`):

- *virtual indices*: file f's row r is index `offsets[f] + r`; the Loader's metadata is the files'
  metadata tables one after the other, so FFCV's traversal order and the decoder's `metadata[i]`
  index every file's rows;
- *storage*: `FileSetMemory` replaces the Loader's memory manager; its state is a tuple of one FFCV
  state per file (OS cache: memory map; process cache: the pages FFCV loads for that file's rows of
  each batch), and the decoder reads a sample from the file its params row names (ffcv_ops.P_FILE).

Batches therefore mix rows of both files freely: they are exactly the shared epoch draw's batches,
as on every other backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ffcv.memory_managers import OSCacheManager, ProcessCacheManager
from ffcv.reader import Reader

from cornpipe.errors import LoaderError
from cornpipe.shards import fields as F


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_beton(path: Path, count: int, labels: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Reader:
    """Open `path` with FFCV's Reader and check it is whole and holds the manifest's rows, so that a
    damaged file is a one-line LoaderError rather than a crash inside the memory map."""
    if not path.is_file():
        raise LoaderError(f"{path} is missing (rerun cornpipe convert)")
    try:
        reader = Reader(str(path))
        size = path.stat().st_size
        fields = list(reader.field_names)
        meta = reader.metadata
        table = reader.alloc_table
        if len(meta) != int(reader.num_samples) or len(table) == 0:
            raise ValueError("metadata or allocation table cut short")
        ends = table["ptr"].astype(np.uint64) + table["size"].astype(np.uint64)
        if int(ends.max()) > size:
            raise ValueError("allocation table points past the end of the file")
        image = meta[f"f{fields.index(F.IMAGE)}"]
        if not np.isin(image["data_ptr"], table["ptr"]).all():
            raise ValueError("image pointers outside the allocation table")
    except LoaderError:
        raise
    except Exception as exc:  # numpy/ffcv raise assorted errors for a damaged file
        raise LoaderError(f"{path} is truncated or corrupt ({one_line(exc)}); rerun cornpipe convert") from exc
    if int(reader.num_samples) != count:
        raise LoaderError(f"{path} holds {int(reader.num_samples)} rows but manifest.json lists {count}")
    position, grade, sample_id = labels
    for name, want in ((F.SAMPLE_ID, sample_id), (F.POSITION, position), (F.GRADE, grade)):
        if name in fields:
            got = np.asarray(meta[f"f{fields.index(name)}"])
            if not np.allclose(got.astype(np.float64), want.astype(np.float64), atol=1e-4):
                raise LoaderError(f"{path} does not match manifest.json (column {name} differs)")
    return reader


@dataclass(frozen=True)
class BetonSet:
    """The .beton files behind a loader's rows (each checked against manifest.json) and where each row lives."""

    splits: tuple[str, ...]  # the split of each file
    paths: tuple[Path, ...]
    readers: tuple[Reader, ...]
    offsets: np.ndarray  # (files + 1,) int64: file f's rows are virtual indices offsets[f]..offsets[f+1]-1
    file_of: np.ndarray  # (N,) int64: the file of each loader row
    virtual: np.ndarray  # (N,) int64: each loader row's virtual index (what FFCV's order holds)
    sizes: np.ndarray  # (N, 2) int64: each loader row's stored (height, width)

    @classmethod
    def open(cls, shards, locations: list[tuple[str, int]], default_split: str) -> BetonSet:
        """The files holding `locations` ((split, row) per loader row, loaders.common.source_rows),
        in the shard set's split order; `default_split`'s file when there are no rows."""
        used = {s for s, _ in locations} or {default_split}
        splits = tuple(s for s in shards.splits if s in used)
        paths = tuple(Path(shards.beton_path(s)) for s in splits)
        readers = tuple(check_beton(p, shards.count(s), shards.labels(s)) for s, p in zip(splits, paths, strict=True))
        dtypes = {r.metadata.dtype for r in readers}
        if len(dtypes) > 1 or len({int(r.page_size) for r in readers}) > 1:
            raise LoaderError(f"{', '.join(map(str, paths))} were written with different fields or page sizes "
                              f"(rerun cornpipe convert)")
        offsets = np.cumsum([0] + [int(r.num_samples) for r in readers]).astype(np.int64)
        index = {s: f for f, s in enumerate(splits)}
        file_of = np.array([index[s] for s, _ in locations], dtype=np.int64)
        local = np.array([r for _, r in locations], dtype=np.int64)
        sizes = np.zeros((len(locations), 2), dtype=np.int64)
        for f, reader in enumerate(readers):
            image = reader.metadata[f"f{list(reader.field_names).index(F.IMAGE)}"]
            mine = file_of == f
            sizes[mine, 0], sizes[mine, 1] = image["height"][local[mine]], image["width"][local[mine]]
        return cls(splits, paths, readers, offsets, file_of, offsets[file_of] + local, sizes)

    @property
    def biggest(self) -> int:
        """Bytes of the largest decoded image in any file (the decoder's scratch buffer)."""
        most = 3
        for reader in self.readers:
            image = reader.metadata[f"f{list(reader.field_names).index(F.IMAGE)}"]
            if len(image):
                most = max(most, int(image["width"].max()) * int(image["height"].max()) * 3)
        return most

    def locate(self, virtual: int) -> tuple[Path, str, int]:
        """(file, split, row) of a virtual index."""
        f = int(np.searchsorted(self.offsets, virtual, side="right")) - 1
        return self.paths[f], self.splits[f], int(virtual - self.offsets[f])

    def key(self) -> tuple:
        """Identity of the files' contents, for caching what was built on them."""
        out = []
        for p in self.paths:
            st = p.stat()
            out.append((str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def widen(self, loader, os_cache: bool) -> None:
        """Make an FFCV Loader built on paths[0] read every file by virtual index (see the module doc)."""
        if len(self.readers) > 1:
            metadata = np.concatenate([r.metadata for r in self.readers])
            metadata.setflags(write=False)
            loader.reader.metadata = metadata  # what FFCV's EpochIterator hands the decoder
        loader.memory_manager = FileSetMemory(self.readers, self.offsets, os_cache)


class FileSetMemory:
    """FFCV's memory manager interface over several files: one FFCV manager per file."""

    def __init__(self, readers: tuple[Reader, ...], offsets: np.ndarray, os_cache: bool) -> None:
        manager = OSCacheManager if os_cache else ProcessCacheManager
        self.managers = [manager(r) for r in readers]
        self.offsets = offsets
        self.os_cache = os_cache

    def schedule_epoch(self, batches: list[np.ndarray]) -> FileSetContext:
        """batches: virtual indices per batch; each file's manager gets its own rows of each batch."""
        if self.os_cache:  # an OS-cache context ignores the schedule
            return FileSetContext([m.schedule_epoch(None) for m in self.managers])
        contexts = []
        for f, manager in enumerate(self.managers):
            lo, hi = self.offsets[f], self.offsets[f + 1]
            mine = [np.asarray(b)[(np.asarray(b) >= lo) & (np.asarray(b) < hi)] - lo for b in batches]
            contexts.append(manager.schedule_epoch(mine))
        return FileSetContext(contexts)


class FileSetContext:
    """FFCV's MemoryContext interface over one context per file; `state` is their states' tuple."""

    def __init__(self, contexts: list) -> None:
        self.contexts = contexts

    @property
    def state(self) -> tuple:
        return tuple(c.state for c in self.contexts)

    def __enter__(self) -> FileSetContext:
        for c in self.contexts:
            c.__enter__()
        return self

    def start_batch(self, batch: int) -> None:
        for c in self.contexts:
            c.start_batch(batch)

    def __exit__(self, *exc: object) -> None:
        for c in self.contexts:
            c.__exit__(*exc)
