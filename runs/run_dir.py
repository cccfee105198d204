"""The run directory: refuse or clear a used one, read and trim metrics.jsonl, restore the best epoch and report."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn

from cornpipe.errors import ConfigError, CornpipeError
from cornpipe.runs.calibration import CALIBRATION_FILE
from cornpipe.runs.checkpoint import BEST, LAST, load_checkpoint
from cornpipe.runs.config import RESUME_OVERRIDABLE, TrainConfig, merge_for_resume
from cornpipe.runs.early_stopping import EarlyStopping
from cornpipe.runs.ema import ModelEma
from cornpipe.runs.explain import CAM_PANEL_FILE
from cornpipe.runs.lock import LOCK_NAME, FolderLock
from cornpipe.runs.report import (
    CONFIG_FILE,
    CONFUSION_FILE,
    CURVES_FILE,
    GRADE_CONFUSION_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    REPORT_FILE,
    REPORT_HTML_FILE,
    write_report,
)
from cornpipe.runs.tracking import TENSORBOARD_DIR
from cornpipe.shards.atomic import check_can_create, check_not_an_input

RUN_FILES = (METRICS_FILE, CONFIG_FILE, BEST, LAST, REPORT_FILE, REPORT_HTML_FILE, CURVES_FILE, CONFUSION_FILE,
             GRADE_CONFUSION_FILE, PREDICTIONS_FILE, CALIBRATION_FILE, CAM_PANEL_FILE)
RUN_MARKER = ".cornpipe-run"  # written by cornpipe into every run folder it makes: what --force may clear
OWN_ENTRIES = (RUN_MARKER, LOCK_NAME)  # entries that do not make a folder "used"
RESUME_FREE = RESUME_OVERRIDABLE | {"channels_last"}  # may differ on resume (channels_last: resolved per machine)
# a config.json as cornpipe wrote it before the marker existed holds at least these keys
LEGACY_CONFIG_KEYS = ("shards", "out", "model", "epochs", "seed", "data")


def is_run_dir(run: Path) -> bool:
    """A folder cornpipe made: its marker, or (runs made before the marker) a config.json as cornpipe
    writes it next to a metrics.jsonl or checkpoint. A user's own config.json or metrics.jsonl is not one."""
    if (run / RUN_MARKER).is_file():
        return True
    try:
        config = json.loads((run / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and all(k in config for k in LEGACY_CONFIG_KEYS)
            and isinstance(config["data"], dict) and any((run / n).is_file() for n in (METRICS_FILE, BEST, LAST)))


def mark_run_dir(run: Path) -> None:
    """Claim `run` as cornpipe's (the marker holds a run id: a later --force may clear it)."""
    marker = run / RUN_MARKER
    if not marker.is_file():
        marker.write_text(json.dumps({"run_id": uuid.uuid4().hex,
                                      "created": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n")


def _used(run: Path) -> bool:
    return run.is_dir() and any(p.name not in OWN_ENTRIES for p in run.iterdir())


def prepare_run_dir(run: Path, force: bool, dry_run: bool = False) -> None:
    """A fresh run directory: refuse a used one unless --force, then clear only the files a run writes.

    --force takes only a folder cornpipe made (`is_run_dir`); any other non-empty folder is refused,
    whatever files it holds. An --out that cannot be created fails here, before any slow work.
    """
    if run.exists() and not run.is_dir():
        raise ConfigError(f"run directory {run} is a file, not a folder")
    check_can_create(run)
    if _used(run):
        if not force:
            raise ConfigError(f"run directory {run} already exists; use --force to overwrite it "
                              f"or --resume {run} to continue it")
        if not is_run_dir(run):
            raise ConfigError(f"{run} is not a run directory cornpipe made (no {RUN_MARKER}) and is not empty; "
                              "--force overwrites only a run directory's files")
        if not dry_run:
            for name in RUN_FILES:  # only what a run writes: --force never deletes a user's other files
                (run / name).unlink(missing_ok=True)
            for events in (run / TENSORBOARD_DIR).glob("events.out.tfevents.*"):  # an earlier run's --log
                events.unlink()
    if not dry_run:
        run.mkdir(parents=True, exist_ok=True)
        mark_run_dir(run)


def hold_run_dir(run: Path, *, resume: bool, force: bool, log: Callable[[str], None],
                 inputs: Sequence[Path | str | None] = ()) -> FolderLock:
    """The run folder's lock (`with` it for the whole run); a fresh --out is checked before it is made,
    and no file a run writes may be one of its `inputs` (the shard set, --init-weights)."""
    check_not_an_input([run, *(run / name for name in RUN_FILES)], inputs)
    if not resume:
        prepare_run_dir(run, force, dry_run=True)
    elif not run.is_dir():
        raise ConfigError(f"run directory not found: {run}")
    return FolderLock(run, "run", log)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The epoch records of metrics.jsonl; a last line cut short (killed mid-write) is left out, as
    `cornpipe report` does."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            if number == len(lines) and not text.endswith("\n"):
                break  # torn last line
            raise ConfigError(f"{path}: line {number} is not an epoch record; fix or remove it") from exc
    return records


def keep_metrics_until(path: Path, epoch: int) -> None:
    records = [r for r in read_metrics(path) if isinstance(r, dict) and r.get("epoch", 0) <= epoch]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def check_resumed_config(saved: dict[str, Any], cfg: TrainConfig, run: Path) -> None:
    """Refuse to resume `run` under a config its checkpoint was not trained with (as `train --resume`
    refuses such flags): a `cv` rerun resumes its killed fold with the cv's config, not the run's."""
    current = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in RESUME_FREE}
    if cfg.loss_weights is None:  # not set: the run keeps the weights its task plan chose (runs.tasks)
        del current["loss_weights"]
    merge_for_resume(saved, current, str(run))


def check_epochs(cfg: TrainConfig, done: int, run: Path) -> None:
    if cfg.epochs < done:
        raise ConfigError(f"--epochs {cfg.epochs} is fewer than the {done} epochs {run} has done; "
                          f"give --epochs {done} or more to continue it")


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
        _cam_panel(run, console)
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
    console.print(f"report: {run / REPORT_FILE} (one page with its plots: {REPORT_HTML_FILE})")
    return TrainResult(run=run, model=ema.module if ema else model, best_epoch=stopper.best_epoch,
                       best_val=val, epochs_run=epochs_run, stopped_early=stopper.should_stop)


def _cam_panel(run: Path, console: Console) -> None:
    """RUN/cam_panel.png for the report; a run never fails for want of it (the console says why)."""
    from cornpipe.runs.explain import write_cam_panel

    try:
        write_cam_panel(run)
    except (CornpipeError, OSError) as exc:
        console.print(f"no activation-map panel: {exc}", style="yellow")


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
