"""The cv folder: cornpipe's marker with the config it was started with, its lock, and a warning when
folds are too small to mean anything.

A rerun of `cornpipe cv` continues the folder only under the config it started with (finished folds
are skipped, a killed one resumes): another config would mix runs of two configs into one summary, so
it is refused, or with --force the folder's cornpipe outputs are cleared and a new cv starts there.
Fields that do not change what a run learns (device, workers, ...) may differ.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cornpipe.errors import ConfigError
from cornpipe.runs.config import TrainConfig
from cornpipe.runs.lock import LOCK_NAME, FolderLock
from cornpipe.runs.run_dir import is_run_dir
from cornpipe.shards.atomic import check_can_create, check_not_an_input

CV_MARKER = ".cornpipe-cv"
CV_FREE = frozenset({"out", "workers", "device", "amp", "compile", "channels_last", "verify", "dist_timeout"})
SUMMARY_FILES = ("cv.json", "cv.md", "cv.html", "cv_confusion.png", "cv_grade_confusion.png", "cv_calibration.png",
                 "oof_predictions.csv")
RUN_NAME = re.compile(r"^(fold\d+-)?seed\d+$")  # cv.run_name's folders
MIN_FOLD_SAMPLES = 10  # validation samples below which a fold's metrics mean little
MIN_FOLD_PER_CLASS = 2  # validation samples of a position class (present in the data) below which, likewise


def _comparable(cfg: TrainConfig) -> dict[str, Any]:
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in CV_FREE}
    values["shards"] = os.path.realpath(values["shards"])
    values.update(seed=None, fold=None)  # set per run
    return json.loads(json.dumps(values))  # tuples as lists, as the marker holds them


def _runs(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.is_dir() and RUN_NAME.match(p.name) and is_run_dir(p)]


def _legacy_config(out: Path) -> dict[str, Any] | None:
    """A cv folder made before the marker: its first run's config.json, as its cv config."""
    for run in sorted(_runs(out)):
        try:
            saved = json.loads((run / "config.json").read_text(encoding="utf-8"))
            saved = {k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}
            return _comparable(TrainConfig.from_dict(saved, source=str(run / "config.json")))
        except (OSError, ValueError, ConfigError):
            continue
    return None


def _clear(out: Path) -> None:
    """--force: remove what cornpipe wrote into the cv folder (its runs and summary), nothing else."""
    for run in _runs(out):
        shutil.rmtree(run)
    for name in (*SUMMARY_FILES, CV_MARKER):
        (out / name).unlink(missing_ok=True)


def open_cv_dir(out: Path, base: TrainConfig, *, force: bool, log: Callable[[str], None]) -> FolderLock:
    """Lock the cv folder `out` (held by the caller with `with`) and check it may hold this cv."""
    check_can_create(out)
    check_not_an_input([out], [base.shards, base.init_weights])
    lock = FolderLock(out, "cv", log).acquire()
    try:
        _check_or_claim(out, base, force, log)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_or_claim(out: Path, base: TrainConfig, force: bool, log: Callable[[str], None]) -> None:
    current = _comparable(base)
    used = [p for p in out.iterdir() if p.name not in (LOCK_NAME, CV_MARKER)]
    saved = None
    if (out / CV_MARKER).is_file():
        try:
            saved = json.loads((out / CV_MARKER).read_text(encoding="utf-8"))["config"]
        except (OSError, ValueError, KeyError, TypeError):
            saved = None
    elif used:
        saved = _legacy_config(out)
        if saved is None:
            raise ConfigError(f"{out} is not a cv folder cornpipe made (no {CV_MARKER}) and is not empty; "
                              "cv never writes into it: give another --out")
    if saved is not None:  # a setting added since the cv started: the default it ran with, not a change
        defaults = _comparable(TrainConfig())
        saved = {**{k: defaults[k] for k in current.keys() - saved.keys() if k in defaults}, **saved}
    if saved is not None and saved != current:
        changed = ", ".join(f"{k} {saved.get(k)!r} -> {current.get(k)!r}"
                            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k))
        if not force:
            raise ConfigError(f"{out} holds a cv started with another config ({changed}); rerun it with the "
                              "options it started with to continue it, or add --force to start a new cv there")
        log(f"--force: {out} held a cv with another config ({changed}); its runs and summary are removed")
        _clear(out)
    (out / CV_MARKER).write_text(json.dumps({"cv_id": uuid.uuid4().hex if saved is None else _cv_id(out),
                                             "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                             "config": current}) + "\n")


def _cv_id(out: Path) -> str:
    try:
        return str(json.loads((out / CV_MARKER).read_text(encoding="utf-8"))["cv_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return uuid.uuid4().hex


def small_folds(fold: np.ndarray, positions: Sequence[Any], names: Sequence[str]) -> list[str]:
    """A line per fold whose validation part is too small to mean anything (MIN_FOLD_SAMPLES in all,
    or MIN_FOLD_PER_CLASS of a position class the data holds)."""
    positions = np.asarray(positions)
    classes = sorted(set(positions.tolist()))
    lines = []
    for i, name in enumerate(names):
        val = positions[fold == i]
        per_class = {c: int((val == c).sum()) for c in classes}
        few = {c: n for c, n in per_class.items() if n < MIN_FOLD_PER_CLASS}
        if val.size < MIN_FOLD_SAMPLES or few:
            detail = ", ".join(f"{c}: {n}" for c, n in few.items())
            lines.append(f"{name} validates on {val.size} sample(s)" + (f" ({detail})" if few else ""))
    return lines


def warn_small_folds(fold: np.ndarray, names: Sequence[str], samples: Sequence[dict],
                     log: Callable[[str], None]) -> None:
    lines = small_folds(fold, [s["position"] for s in samples], names)
    if lines:
        log(f"WARNING: {len(lines)} of {len(names)} folds are too small for their metrics to mean much "
            f"(under {MIN_FOLD_SAMPLES} validation samples or {MIN_FOLD_PER_CLASS} of a position class): "
            + "; ".join(lines[:5]) + ("; ..." if len(lines) > 5 else "") + ". Use fewer folds or more data.")
