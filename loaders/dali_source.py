"""The per-sample source of the `dali` backend's parallel `fn.external_source` (runs in DALI's workers).

DALI calls `EpochSource(info)` in its Python worker processes, one call per sample, with a
`nvidia.dali.types.SampleInfo` (idx_in_epoch, idx_in_batch, iteration, epoch_idx). The source is
stateless towards DALI, as its docs require: what a call returns depends only on `info` and on the
epoch plan, so any worker can compute any sample and prefetching ahead is harmless.

- Rows: `loaders.sampling.epoch_indices` for the *user's* epoch (set_epoch), this rank. DALI counts
  its own epochs (`epoch_idx`, +1 at each pipeline reset); `EpochPlan`, a 24-byte-a-slot file
  written by the loader before it starts a DALI epoch, maps DALI epoch -> user epoch, and can cancel
  a DALI epoch the consumer abandoned (its remaining calls then stop at once).
- Epoch end: DALI drops a batch in which any sample raises StopIteration, so the epoch is padded to
  whole batches with copies of its first row marked row = -1; the loader cuts them off.
- Bytes: one `os.pread` per sample at the offset of the shard's DALI index (no tar parsing).
- Augmentation: `cornpipe.loaders.common.augment_params` for (seed, epoch, rank, slot), the torch
  backend's draw, emitted as a resize ROI (a flip is a reversed ROI edge), a rotation angle and the
  colour-jitter factors, so DALI only decodes, resizes and rotates.

Picklable by design (module-level class, numpy arrays and strings only) for `py_start_method="spawn"`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cornpipe.errors import LoaderError
from cornpipe.loaders.common import LoaderSpec, augment_params, cut_to_batches, epoch_rows

ERROR_MARK = "cornpipe-dali:"  # prefixes a LoaderError raised in a worker, so the loader can find it
PLAN_SLOTS = 256  # DALI epochs remembered by the plan file (a ring)
_SLOT = struct.Struct("<qqq")  # dali_epoch, user_epoch, active


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

    @property
    def rotates(self) -> bool:
        """Whether the samples carry a rotation angle (only when rot90 augmentation is on)."""
        return self.loader.augment is not None and self.loader.augment.rot90

    def rows(self, user_epoch: int) -> np.ndarray:
        """This rank's rows of `user_epoch`, cut (drop_last) or padded with -1 to whole batches."""
        rows = cut_to_batches(epoch_rows(self.loader, self.position, self.grade, user_epoch), self.loader)
        pad = -len(rows) % self.loader.batch_size
        return np.concatenate([rows, np.full(pad, -1, dtype=np.int64)]) if pad else rows


def geometry(spec: SourceSpec, row: int, user_epoch: int, slot: int) -> tuple[np.ndarray, ...]:
    """(roi_start (2,), roi_end (2,), angle (), jitter (3,)) of one sample; ROI in (y, x) pixels."""
    p = augment_params(spec.loader, spec.hw[row:row + 1], user_epoch, slot)
    top, left, h, w = p.boxes[0]
    y0, y1 = (top + h, top) if p.vflip[0] else (top, top + h)  # a reversed edge flips DALI's resize
    x0, x1 = (left + w, left) if p.hflip[0] else (left, left + w)
    return (np.array([y0, x0], np.float32), np.array([y1, x1], np.float32),
            np.array(90.0 * p.rot90[0], np.float32), p.jitter[0].astype(np.float32))


class EpochSource:
    """DALI parallel external source: SampleInfo -> (jpeg, row, roi_start, roi_end, jitter[, angle])."""

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

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        epoch = self._epoch_rows(int(info.epoch_idx))
        if epoch is None:
            raise StopIteration  # the consumer abandoned this epoch
        user_epoch, rows = epoch
        slot = int(info.idx_in_epoch)
        if slot >= len(rows):
            raise StopIteration
        row = int(rows[slot])
        source_row = row if row >= 0 else int(rows[0])  # padding repeats the epoch's first row
        roi_start, roi_end, angle, jitter = geometry(self.spec, source_row, user_epoch, slot)
        out = (self._read(source_row), np.array(row, np.int64), roi_start, roi_end, jitter)
        return (*out, angle) if self.spec.rotates else out

    def close(self) -> None:
        for fd in (*self._fds.values(), *([self._plan_fd] if self._plan_fd is not None else [])):
            os.close(fd)
        self._fds.clear()
        self._plan_fd = None
