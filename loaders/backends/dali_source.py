"""The source of the `dali` backend's parallel `fn.external_source` (runs in DALI's worker processes).

DALI calls `EpochSource(info)` in its Python workers, one call per batch (`batch=True`), with a
`nvidia.dali.types.BatchInfo` (iteration, epoch_idx). The source is stateless towards DALI, as its
docs require: what a call returns depends only on `info` and on the epoch plan, so any worker can
compute any batch and prefetching ahead is harmless. One call per batch rather than per sample:
DALI's per-sample calls and the per-sample draws cost more CPU than decoding a small JPEG.

- Rows: `loaders.sampling.epoch_indices` for the *user's* epoch (set_epoch), this rank. DALI counts
  its own epochs (`epoch_idx`, +1 at each pipeline reset); `EpochPlan`, a 24-byte-a-slot file
  written by the loader before it starts a DALI epoch, maps DALI epoch -> user epoch, and can cancel
  a DALI epoch the consumer abandoned (its remaining calls then stop at once).
- Epoch end: the last batch is as short as the epoch leaves it (DALI takes batches of any size up
  to the pipeline's); a call past it raises StopIteration, DALI's end of epoch.
- Bytes: one `os.pread` per sample at the offset of the shard's DALI index (no tar parsing).
- Augmentation: `cornpipe.loaders.common.augment_params` for (seed, epoch, rank, batch), the ffcv and
  resident backends' draw, emitted as an integer window to decode (ROI decoding), the exact resize
  ROI inside it (a flip is a reversed ROI edge), a rotation angle and the colour-jitter factors
  (the last two only when those steps are on), so DALI only decodes, resizes and rotates.

Picklable by design (module-level class, numpy arrays and strings only) for `py_start_method="spawn"`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cornpipe.errors import LoaderError
from cornpipe.loaders.common import LoaderSpec, augment_params, cut_to_batches, epoch_rows
from cornpipe.shards import fields as F
from cornpipe.shards.shard_set import parse_dali_index

ERROR_MARK = "cornpipe-dali:"  # prefixes a LoaderError raised in a worker, so the loader can find it
PLAN_SLOTS = 256  # DALI epochs remembered by the plan file (a ring)
_SLOT = struct.Struct("<qqq")  # dali_epoch, user_epoch, active


def index_shards(shards, split: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(tar paths, shard of row, JPEG offset, JPEG size) of every row; one-line LoaderError naming
    the file when a tar or index is missing, cut short or disagrees with the manifest."""
    tars, shard, offset, size = [], [], [], []
    for k, (tar, idx) in enumerate(shards.shards(split)):
        tar, idx = Path(tar), Path(idx)
        if not tar.is_file():
            raise LoaderError(f"shard {tar} is missing")
        entries = parse_dali_index(idx)
        try:
            spans = np.array([e[F.TAR_IMAGE_EXT] for e in entries], dtype=np.int64).reshape(-1, 2)
        except KeyError:
            raise LoaderError(f"index file {idx} is corrupt (a sample has no '{F.TAR_IMAGE_EXT}')") from None
        if len(spans) and int((spans[:, 0] + spans[:, 1]).max()) > tar.stat().st_size:
            raise LoaderError(f"shard {tar} is truncated (its index points past the end of the file)")
        tars.append(str(tar))
        shard.append(np.full(len(spans), k, dtype=np.int32))
        offset.append(spans[:, 0])
        size.append(spans[:, 1])
    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    shard_a, offset_a, size_a = cat(shard, np.int32), cat(offset, np.int64), cat(size, np.int64)
    if len(shard_a) != shards.count(split):
        raise LoaderError(f"the {split} shards index {len(shard_a)} samples but manifest.json lists "
                          f"{shards.count(split)}")
    return tars, shard_a, offset_a, size_a


def row_locations(shards, locations: list[tuple[str, int]]) -> tuple[list[str], np.ndarray, ...]:
    """(tar paths, shard of row, JPEG offset, JPEG size, stored (h, w)) of each (split, row) in
    `locations`: the rows of one split, or any sample ids from both (cross-validation folds)."""
    tars: list[str] = []
    per_split: dict[str, tuple[np.ndarray, ...]] = {}
    for split in dict.fromkeys(s for s, _ in locations):  # the splits used, in first-use order
        split_tars, shard, offset, size = index_shards(shards, split)
        hw = np.array([[s["height"], s["width"]] for s in shards.samples(split)], dtype=np.int64).reshape(-1, 2)
        per_split[split] = (shard + len(tars), offset, size, hw)  # shard numbers into the joint tar list
        tars += split_tars

    def column(k: int, dtype: type) -> np.ndarray:
        return np.array([per_split[s][k][r] for s, r in locations], dtype=dtype)

    return (tars, column(0, np.int32), column(1, np.int64), column(2, np.int64),
            column(3, np.int64).reshape(-1, 2))


class EpochPlan:
    """DALI epoch -> (user epoch, still wanted?), shared with the worker processes through a file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            self.path.write_bytes(b"\xff" * _SLOT.size * PLAN_SLOTS)

    def write(self, dali_epoch: int, user_epoch: int, active: bool) -> None:
        with open(self.path, "r+b") as f:
            os.pwrite(f.fileno(), _SLOT.pack(dali_epoch, user_epoch, int(active)),
                      (dali_epoch % PLAN_SLOTS) * _SLOT.size)

    @staticmethod
    def read(fd: int, dali_epoch: int) -> tuple[int, bool] | None:
        data = os.pread(fd, _SLOT.size, (dali_epoch % PLAN_SLOTS) * _SLOT.size)
        epoch, user_epoch, active = _SLOT.unpack(data)
        if epoch != dali_epoch:
            return None
        return user_epoch, bool(active)


@dataclass
class SourceSpec:
    """Everything a worker needs to produce any sample of any epoch (picklable): the loader's own
    request, the split's labels and where each row's bytes are."""

    loader: LoaderSpec  # the resolved request (oversampling, seed, rank, batch size, augmentation)
    tars: list[str]  # shard paths
    shard: np.ndarray  # (N,) int32: which tar holds row r
    offset: np.ndarray  # (N,) int64: byte offset of row r's JPEG in its tar
    size: np.ndarray  # (N,) int64: its length
    hw: np.ndarray  # (N, 2) int64: stored height, width of row r
    position: np.ndarray  # (N,) the split's labels: the oversampling draw depends on them
    grade: np.ndarray
    plan: str  # EpochPlan path
    cells: np.ndarray | None = None  # the rows' oversampling cells (loaders.common.row_cells)

    @property
    def rotates(self) -> bool:
        """Whether the samples carry a rotation angle (only when rot90 augmentation is on)."""
        return self.loader.augment is not None and self.loader.augment.rot90

    @property
    def jitters(self) -> bool:
        """Whether the batches carry colour-jitter factors (some jitter strength is not 0)."""
        a = self.loader.augment
        return a is not None and any(v > 0 for v in (a.brightness, a.contrast, a.saturation))

    def rows(self, user_epoch: int) -> np.ndarray:
        """This rank's rows of `user_epoch` (without the last, partial batch when drop_last)."""
        return cut_to_batches(epoch_rows(self.loader, self.position, self.grade, user_epoch, self.cells), self.loader)


class Geometry(NamedTuple):
    """One batch's crop boxes as DALI takes them: an integer window to decode (ROI decoding) and the
    exact ROI to resize inside it. (x, y) order for the decoder, (y, x) for the resize."""

    anchor: np.ndarray  # (B, 2) int32: x, y of the decoded window in the stored image
    shape: np.ndarray  # (B, 2) int32: its width, height (the box's pixels, rounded outwards)
    roi_start: np.ndarray  # (B, 2) float32: y, x of the box in the window; a flip reverses its edge
    roi_end: np.ndarray  # (B, 2) float32
    angle: np.ndarray  # (B,) float32: rot90 in degrees
    jitter: np.ndarray  # (B, 3) float32: brightness, contrast, saturation factors


def geometry(spec: SourceSpec, rows: np.ndarray, user_epoch: int, batch: int) -> Geometry:
    """The shared augmentation draw of batch `batch` of `user_epoch` (one draw per batch, as the ffcv and
    resident backends), as a decode window and a resize ROI per image."""
    sizes = spec.hw[rows]  # (B, 2) stored height, width
    p = augment_params(spec.loader, sizes, user_epoch, batch)
    top, left, h, w = p.boxes.T
    y0 = np.clip(np.floor(top), 0, sizes[:, 0] - 1)
    x0 = np.clip(np.floor(left), 0, sizes[:, 1] - 1)
    y1 = np.maximum(np.minimum(np.ceil(top + h), sizes[:, 0]), y0 + 1)
    x1 = np.maximum(np.minimum(np.ceil(left + w), sizes[:, 1]), x0 + 1)
    start = np.stack([top - y0, left - x0], axis=1)
    end = start + np.stack([h, w], axis=1)
    flip = np.stack([p.vflip, p.hflip], axis=1)  # a reversed edge flips DALI's resize
    roi_start, roi_end = np.where(flip, end, start), np.where(flip, start, end)
    return Geometry(np.stack([x0, y0], axis=1).astype(np.int32), np.stack([x1 - x0, y1 - y0], axis=1).astype(np.int32),
                    roi_start.astype(np.float32), roi_end.astype(np.float32),
                    (90.0 * p.rot90).astype(np.float32), p.jitter.astype(np.float32))


class EpochSource:
    """DALI parallel external source, one call per batch: BatchInfo -> (jpegs, rows, anchor, shape,
    roi_start, roi_end[, angle][, jitter]) of that batch (the last one of an epoch may be short)."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self._fds: dict[int, int] = {}
        self._plan_fd: int | None = None
        self._rows: tuple[int, int, np.ndarray] | None = None  # (dali epoch, user epoch, rows)

    def __getstate__(self) -> dict:
        return {"spec": self.spec}  # file descriptors stay in the process that opened them

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["spec"])

    def _fail(self, message: str) -> LoaderError:
        return LoaderError(f"{ERROR_MARK} {message}")

    def _epoch_rows(self, dali_epoch: int) -> tuple[int, np.ndarray] | None:
        if self._plan_fd is None:
            self._plan_fd = os.open(self.spec.plan, os.O_RDONLY)
        plan = EpochPlan.read(self._plan_fd, dali_epoch)
        if plan is None:
            raise self._fail(f"no epoch plan for DALI epoch {dali_epoch} in {self.spec.plan}")
        user_epoch, active = plan
        if not active:
            return None
        if self._rows is None or self._rows[:2] != (dali_epoch, user_epoch):
            self._rows = (dali_epoch, user_epoch, self.spec.rows(user_epoch))
        return user_epoch, self._rows[2]

    def _read(self, row: int) -> np.ndarray:
        s = self.spec
        k = int(s.shard[row])
        tar = s.tars[k]
        if k not in self._fds:
            try:
                self._fds[k] = os.open(tar, os.O_RDONLY)
            except FileNotFoundError:
                raise self._fail(f"shard {tar} is missing") from None
        size = int(s.size[row])
        data = os.pread(self._fds[k], size, int(s.offset[row]))
        if len(data) != size:
            raise self._fail(f"shard {tar} is truncated (row {row} ends past the end of the file)")
        return np.frombuffer(data, dtype=np.uint8)

    def __call__(self, info) -> tuple:
        epoch = self._epoch_rows(int(info.epoch_idx))
        if epoch is None:
            raise StopIteration  # the consumer abandoned this epoch
        user_epoch, rows = epoch
        b, bs = int(info.iteration), self.spec.loader.batch_size
        rows = rows[b * bs:(b + 1) * bs]
        if not len(rows):
            raise StopIteration  # DALI asks (and prefetches) past the epoch's last batch
        g = geometry(self.spec, rows, user_epoch, b)
        out = ([self._read(int(r)) for r in rows], rows.astype(np.int64), g.anchor, g.shape, g.roi_start, g.roi_end)
        return (*out, *([g.angle] if self.spec.rotates else []), *([g.jitter] if self.spec.jitters else []))

    def close(self) -> None:
        for fd in (*self._fds.values(), *([self._plan_fd] if self._plan_fd is not None else [])):
            os.close(fd)
        self._fds.clear()
        self._plan_fd = None


def worker_error(exc: BaseException | None) -> str | None:
    """The message of a LoaderError raised in a DALI worker (`ERROR_MARK`, carried as text through the chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if ERROR_MARK in text:
            return text.split(ERROR_MARK, 1)[1].strip().splitlines()[0]
        exc = exc.__cause__ or exc.__context__
    return None
