"""The run directory: refuse or clear a used one, read and trim metrics.jsonl, restore the best epoch and report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn

from cornpipe.errors import ConfigError
from cornpipe.runs.checkpoint import BEST, LAST, load_checkpoint
from cornpipe.runs.config import TrainConfig
from cornpipe.runs.early_stopping import EarlyStopping
from cornpipe.runs.ema import ModelEma
from cornpipe.runs.report import (
    CONFIG_FILE,
    CONFUSION_FILE,
    CURVES_FILE,
    METRICS_FILE,
    REPORT_FILE,
    write_report,
)
from cornpipe.shards.atomic import check_can_create

PREDICTIONS_FILE = "val_predictions.csv"  # the best epoch's per-sample validation predictions (runs.evaluation)
RUN_FILES = (METRICS_FILE, CONFIG_FILE, BEST, LAST, REPORT_FILE, CURVES_FILE, CONFUSION_FILE, PREDICTIONS_FILE)
RUN_MARKERS = (METRICS_FILE, CONFIG_FILE, BEST, LAST)  # what makes a folder a run directory


def prepare_run_dir(run: Path, force: bool, dry_run: bool = False) -> None:
    """A fresh run directory: refuse a used one unless --force, then clear only the files a run writes.

    --force takes only a folder that already holds a run (one of RUN_MARKERS); any other non-empty
    folder is refused. An --out that cannot be created fails here, before any slow work.
    """
    if run.exists() and not run.is_dir():
        raise ConfigError(f"run directory {run} is a file, not a folder")
    check_can_create(run)
    if run.exists() and any(run.iterdir()):
        if not force:
            raise ConfigError(f"run directory {run} already exists; use --force to overwrite it "
                              f"or --resume {run} to continue it")
        if not any((run / name).exists() for name in RUN_MARKERS):
            raise ConfigError(f"{run} is not a run directory (it has none of {', '.join(RUN_MARKERS)}) and "
                              "is not empty; --force overwrites only a run directory's files")
        if not dry_run:
            for name in RUN_FILES:  # only what a run writes: --force never deletes a user's other files
                (run / name).unlink(missing_ok=True)
    if not dry_run:
        run.mkdir(parents=True, exist_ok=True)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def keep_metrics_until(path: Path, epoch: int) -> None:
    records = [r for r in read_metrics(path) if r["epoch"] <= epoch]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@dataclass
class TrainResult:
    run: Path
    model: nn.Module  # the best epoch's weights (EMA weights when cfg.ema)
    best_epoch: int
    best_val: dict[str, Any]  # validation metrics of the best epoch
    epochs_run: int  # epochs completed in total (including those before a resume)
    stopped_early: bool


def restore_best_and_report(run: Path, cfg: TrainConfig, model: nn.Module, ema: ModelEma | None,
                            stopper: EarlyStopping, console: Console, epochs_run: int,
                            report: bool = True) -> TrainResult:
    """Restore the best checkpoint, write the report (unless `report` is False: DDP ranks other than
    0 only read) and say what the best epoch reached."""
    best = load_checkpoint(run / BEST, map_location=cfg.device)
    model.load_state_dict(best["model"])
    if ema is not None:
        ema.load_state_dict(best["ema"])
    if report:
        write_report(run)
    val = best["val"]
    ci = val.get("ci", {})

    def show(name: str) -> str:
        lo_hi = f" [{ci[name][0]:.3f}, {ci[name][1]:.3f}]" if name in ci else ""
        return f"{name} {val[name]:.3f}{lo_hi}"

    console.print(f"best epoch {stopper.best_epoch} of {epochs_run} (monitor {cfg.monitor} = {stopper.best:.4f})"
                  f"{'; stopped early' if stopper.should_stop else ''}")
    console.print("val: " + ", ".join(show(k) for k in ("position_accuracy", "position_macro_f1",
                                                          "grade_mae", "grade_within_tol")))
    console.print(f"report: {run / REPORT_FILE}")
    return TrainResult(run=run, model=ema.module if ema else model, best_epoch=stopper.best_epoch,
                       best_val=val, epochs_run=epochs_run, stopped_early=stopper.should_stop)


def shard_identity(root: Path | str, counts: dict[str, int]) -> dict[str, Any]:
    """What identifies a shard set for a run: its manifest's sha256 and its split counts."""
    from cornpipe.shards.fields import MANIFEST
    from cornpipe.shards.manifest import sha256_file

    return {"manifest_sha256": sha256_file(Path(root) / MANIFEST), "counts": dict(counts)}


def check_resumed_shards(saved: dict[str, Any], current: dict[str, Any], run: Path, shards: str,
                         allow_new: bool) -> dict[str, Any] | None:
    """Refuse to resume `run` on a shard set other than the one it was trained on, unless `allow_new`;
    then return the change to record (config.json and the report say so). None: the same set (or a
    run from before identities were recorded)."""
    before = saved.get("identity")
    if before is None or before == current["identity"]:
        return None
    old, new = before, current["identity"]
    what = (f"manifest sha256 {old['manifest_sha256'][:12]} -> {new['manifest_sha256'][:12]}, "
            f"train/val {old['counts'].get('train')}/{old['counts'].get('val')} -> "
            f"{new['counts'].get('train')}/{new['counts'].get('val')}")
    if not allow_new:
        raise ConfigError(f"{shards} is not the shard set {run} was trained on ({what}); "
                          f"pass --allow-new-shards to continue on it anyway")
    return {"from": old, "to": new, "summary": what}
