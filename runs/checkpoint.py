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
    environment   runs.environment.environment(): versions, CUDA, device, git revision (config.json's too)
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cornpipe.errors import CheckpointError

CHECKPOINT_FORMAT = 1
BEST = "best.pt"
LAST = "last.pt"
FULL_BELOW = 1 << 20  # bytes free under which a failed write is taken for a full disk
_ZIP_MAGIC = b"PK\x03\x04"  # the first bytes of every file torch.save writes



def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`.

    A crash mid-write leaves the previous checkpoint intact (os.replace is atomic on POSIX); a failed
    write (a full disk: torch words it as a RuntimeError from its zip writer) or an interrupt removes
    the temp file, and a failure is one CheckpointError line. Only kill -9 can leave the temp file:
    `--resume` removes it (resume_state).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        full = _disk_full(path.parent, exc)  # before the temp file goes and frees its space
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):
            raise CheckpointError(_save_failure(path, exc, full)) from exc
        raise


def _disk_full(folder: Path, exc: BaseException) -> bool:
    """torch words a full disk in its zip writer's terms ("file write failed", "unexpected pos ..."),
    not as ENOSPC: a file system with (next to) nothing free says it."""
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "No space left" in str(exc):
        return True
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW
    except OSError:
        return False


def _save_failure(path: Path, exc: BaseException, full: bool) -> str:
    text = str(exc)
    if full:
        free = shutil.disk_usage(path.parent).free / 1e6
        why = f"no space left on {path.parent} ({free:.1f} MB free with the partial file removed)"
    else:
        why = (getattr(exc, "strerror", None) or text.strip().splitlines()[0]) if text.strip() else type(exc).__name__
    kept = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
    return f"cannot write checkpoint {path}: {why}; {kept}"


# what each reader needs a checkpoint to hold, and the type it must have: a crafted or foreign file
# with the right format number must still fail as one line, not as a KeyError deep in the trainer
_NEEDS: dict[str, dict[str, tuple[type, ...]]] = {
    "predict": {"config": (dict,), "data": (dict,), "model": (dict,)},
    "resume": {"epoch": (int,), "config": (dict,), "data": (dict,), "model": (dict,), "optimizer": (dict,),
               "scaler": (dict,), "early_stopping": (dict,)},
}
_DATA_NEEDS = {"predict": ("positions", "grade_scale", "convert"), "resume": ("positions", "grade_scale")}


def check_contents(state: dict[str, Any], path: Path, purpose: str) -> None:
    """One CheckpointError line when `state` lacks what `purpose` ("predict", "resume") reads."""
    for key, kinds in _NEEDS[purpose].items():
        value = state.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool):
            what = "is missing" if key not in state else f"is a {type(value).__name__}, not a {kinds[0].__name__}"
            raise CheckpointError(f"{path} cannot be used to {purpose}: its {key!r} {what}")
    if "epoch" in _NEEDS[purpose] and state["epoch"] < 0:
        raise CheckpointError(f"{path} cannot be used to {purpose}: its epoch is {state['epoch']}")
    missing = [k for k in _DATA_NEEDS[purpose] if k not in state["data"]]
    if missing:
        raise CheckpointError(f"{path} cannot be used to {purpose}: its data lacks {', '.join(missing)}")


def load_weights(model: torch.nn.Module, weights: Any, path: Path, model_name: str) -> None:
    """model.load_state_dict, with weights that do not fit the model (another --model, a crafted file)
    worded as one CheckpointError line instead of torch's list of every mismatched key."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(first[1].split())[:160] if len(first) > 1 else (first[0][:160] if first else "")
        raise CheckpointError(f"the weights in {path} do not fit its model {model_name} ({detail})") from exc


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", purpose: str | None = None) -> dict[str, Any]:
    """Load with weights_only=True; one-line CheckpointError when missing, corrupt or foreign, or
    (with `purpose` "predict" or "resume") when it lacks what that reader needs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(_load_failure(path, exc)) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a cornpipe checkpoint (format {CHECKPOINT_FORMAT})")
    if purpose is not None:
        check_contents(state, path, purpose)
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


def resume_state(run: Path, map_location: str = "cpu", log: Callable[[str], None] | None = None,
                 purpose: str | None = "resume") -> dict[str, Any]:
    """The last complete checkpoint of `run`: last.pt, or best.pt when last.pt is missing or cut short
    (a kill while epoch 1's last.pt was written; best.pt then holds the same epoch or an earlier one,
    and the epochs after it train again). With `log` (the caller holds the run's lock) temp files of an
    unfinished checkpoint write are removed, with a line each."""
    if log is not None:
        for tmp in sorted(run.glob(".*.pt.tmp")):
            tmp.unlink(missing_ok=True)
            log(f"removed {tmp}: a checkpoint write that did not finish (the run was stopped mid-save)")
    path = run / LAST
    try:
        state = load_checkpoint(path, map_location=map_location)
    except CheckpointError as exc:  # missing or cut short; a complete but unusable last.pt is not skipped
        if not (run / BEST).is_file():
            raise
        try:
            state = load_checkpoint(run / BEST, map_location=map_location)
        except CheckpointError:
            raise exc from None
        path = run / BEST
        if log is not None:
            log(f"{exc}; resuming from {path} (epoch {state.get('epoch')}): the epochs after it train again")
    if purpose is not None:
        check_contents(state, path, purpose)
    return state


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
