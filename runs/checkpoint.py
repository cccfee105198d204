"""Checkpoints: written atomically, readable with `torch.load(weights_only=True)`.

A checkpoint is a plain dict of tensors, dicts, lists and numbers (never pickled objects), so that
loading one can never run code:

    format        CHECKPOINT_FORMAT
    epoch         completed epochs (int)
    config        TrainConfig.to_dict()
    data          {"positions": [...], "grade_scale": [...], "shards": str, "counts": {split: n},
                   "convert": {"write_mode", "max_resolution", "jpeg_quality"}, "tasks": runs.tasks.TaskPlan}
                  (what predict needs to rebuild the model and preprocess like validation; "tasks": a task
                  constant in the train split, its loss weight, what the monitor ignores)
    model         state_dict of the raw (uncompiled) model
    ema           {"module": state_dict, "updates": int} or None
    optimizer     optimizer.state_dict()
    scaler        GradScaler.state_dict() ({} when disabled)
    scheduler     ReduceLROnPlateau.state_dict() or None
    early_stopping {"best": float, "best_epoch": int, "bad_epochs": int}
    rng           {"torch": uint8 tensor, "cuda": [uint8 tensor, ...]} at the end of the epoch (for
                  the record: the trainer reseeds from (seed, epoch) at each epoch start)
    val           validation metrics of this epoch (as in metrics.jsonl)
    val_predictions this epoch's per-sample validation predictions (runs.evaluation), written out as
                  RUN/val_predictions.csv from best.pt at the end of a run
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from cornpipe.errors import CheckpointError

CHECKPOINT_FORMAT = 1
BEST = "best.pt"
LAST = "last.pt"
_ZIP_MAGIC = b"PK\x03\x04"  # the first bytes of every file torch.save writes



def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    A crash mid-write leaves the previous checkpoint intact (os.replace is atomic on POSIX).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True; one-line CheckpointError when missing, corrupt or foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(_load_failure(path, exc)) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a cornpipe checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def _load_failure(path: Path, exc: BaseException) -> str:
    """Why torch.load(weights_only=True) failed, in words for the user (never torch's advice to retry
    with weights_only=False: a file that needs it is not a cornpipe checkpoint and may run code)."""
    if isinstance(exc, pickle.UnpicklingError) and "unsupported global" in str(exc).lower():
        return (f"{path} is not a cornpipe checkpoint: it holds pickled Python objects, "
                "which cornpipe never loads (they could run code)")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        size, head = -1, b""
    # torch.save writes a zip; cut short, it loses the central directory at its end, and torch reports
    # that as a miniz error, [Errno 22] or EOFError depending on where the cut falls
    if size == 0 or (head and head == _ZIP_MAGIC[:len(head)] and not zipfile.is_zipfile(path)):
        return f"checkpoint {path} is truncated (only {size} bytes): a save or copy did not finish"
    if isinstance(exc, pickle.UnpicklingError):  # junk, or a pickle torch's safe loader cannot read
        return f"cannot read checkpoint {path}: it is not a cornpipe checkpoint (not a file written by torch.save)"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot read checkpoint {path}: {first_line}"


def rng_state() -> dict[str, Any]:
    """Global torch RNG states as tensors (the trainer draws no numpy/python random numbers)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def inference_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights to predict with: the EMA weights when the run kept them, else the model's."""
    ema = state.get("ema")
    return ema["module"] if ema else state["model"]
