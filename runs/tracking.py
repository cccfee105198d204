"""Run tracking beside metrics.jsonl: `--log tensorboard` and `--deterministic` (issue 23).

`epoch_logger(cfg, run, ...)` is the epoch loop's logger: a callable taking each epoch's metrics.jsonl
record. With `log = "tensorboard"` it writes every number of the record as a scalar (`train/loss`,
`val/position_macro_f1`, `lr`, `train/images_per_s`, ...; step = the record's 1-based epoch) and the
validation confusion matrix as an image into RUN/tensorboard/, so `tensorboard --logdir RUN` shows
what metrics.jsonl holds. Only the process that writes the run folder (rank 0) logs.

`set_deterministic(cfg)` sets the torch flags a reproducible run needs; train() calls it before the
first CUDA call, as cuBLAS reads CUBLAS_WORKSPACE_CONFIG once.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from cornpipe.errors import ConfigError, install_hint
from cornpipe.runs.config import TrainConfig

TENSORBOARD_DIR = "tensorboard"  # inside the run folder
# what a deterministic run costs, said once at its start
DETERMINISTIC_COST = ("deterministic: torch's deterministic algorithms on, cuDNN autotuning off: some CUDA ops "
                      "run slower, and one without a deterministic kernel stops the run with an error")
CUBLAS_WORKSPACE = ":4096:8"  # torch's reproducibility notes: cuBLAS needs a fixed workspace to be deterministic

EpochLog = Callable[[dict[str, Any]], None]


def check_logger(cfg: TrainConfig) -> None:
    """Refuse a logger whose package is missing, before any work (ConfigError naming the extra)."""
    if cfg.log == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(f"--log tensorboard needs the tensorboard package: {install_hint('tensorboard')}")


def set_deterministic(cfg: TrainConfig) -> str | None:
    """With cfg.deterministic: deterministic kernels everywhere, cuDNN's autotuner off, cuBLAS's fixed
    workspace on CUDA; returns the line saying what that costs. The flags are process-wide (as torch's
    own), so they stay set after the run; without cfg.deterministic nothing is changed."""
    if not cfg.deterministic:
        return None
    if cfg.device.startswith("cuda"):  # a workspace the user chose (":16:8" is the other valid one) stands
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False  # autotuning picks kernels by timing: another choice per run
    torch.backends.cudnn.deterministic = True
    return DETERMINISTIC_COST


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl record, by TensorBoard tag: `lr`, `monitor`, `time_s` and
    `train/<key>`, `val/<key>` for each number of the split (intervals, recall and confusion stay in
    metrics.jsonl; the confusion is an image)."""
    tags = {key: float(record[key]) for key in ("lr", "monitor", "time_s") if _is_number(record.get(key))}
    for split in ("train", "val"):
        for key, value in (record.get(split) or {}).items():
            if _is_number(value) and key != "n_samples":
                tags[f"{split}/{key}"] = float(value)
    return tags


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@contextmanager
def epoch_logger(cfg: TrainConfig, run: Path, positions: Sequence[str], *, start_epoch: int,
                 enabled: bool = True) -> Iterator[EpochLog]:
    """The epoch loop's logger (see the module docstring); a no-op without --log or off rank 0. A resumed
    run (start_epoch > 0) drops what an earlier process logged after its last.pt, as metrics.jsonl does."""
    if cfg.log == "none" or not enabled:
        yield lambda record: None
        return
    check_logger(cfg)
    from torch.utils.tensorboard import SummaryWriter

    from cornpipe.runs.plots import confusion_figure

    writer = SummaryWriter(str(run / TENSORBOARD_DIR), purge_step=start_epoch + 1 if start_epoch else None)

    def log(record: dict[str, Any]) -> None:
        step = record["epoch"]
        for tag, value in scalars(record).items():
            writer.add_scalar(tag, value, step)
        confusion = (record.get("val") or {}).get("confusion")
        if confusion:
            writer.add_figure("val/confusion", confusion_figure(confusion, list(positions), f"epoch {step}"),
                              step)  # closes the figure
        writer.flush()  # each epoch readable while the run goes on

    try:
        yield log
    finally:
        writer.close()
