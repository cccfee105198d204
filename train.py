"""Train a model (a ResNet-Plus or a timm trunk, with the two heads) on a cornpipe shard set: position
(classification) + grade (regression).

    cornpipe train SHARDS --out RUN [options]     (same as: python -m cornpipe train SHARDS --out RUN ...)
    cornpipe train --resume RUN [--epochs N]      continue RUN from RUN/last.pt

The options, their help and their TOML form are the CLI's (cornpipe/cli/runs.py); every default lives
in `cornpipe.runs.config.TrainConfig`.

RUN gets config.json (the resolved config), metrics.jsonl (one line per epoch), best.pt and last.pt
(loadable with torch.load(weights_only=True)), report.md, curves.png, confusion_matrix.png and
val_predictions.csv (the best epoch's prediction for every validation sample).

Several processes (torchrun + DistributedDataParallel; `cornpipe train --nproc N` launches torchrun):
--batch-size is per process, --lr is used as given; each rank trains on its own slice of every epoch,
validates a disjoint, unpadded shard of the val split, and every rank gathers all predictions, so the
logged metrics equal one process's over the whole split. Only rank 0 writes RUN (cornpipe.runs.distributed).

Cross-validation: with TrainConfig.folds / fold_group the run trains and validates on one fold of ALL
samples, whichever split holds them (cornpipe.runs.cv; `cornpipe cv` runs every fold).

Read top to bottom: train_one_epoch (its step is cornpipe.runs.optim.optimizer_step), train(), then fit()
with the one loop; what comes before the first epoch is cornpipe.runs.session.setup (the run itself from
cornpipe.runs.build); validation (evaluate, the predictions file) is cornpipe.runs.evaluation.

Reproducibility: every random draw is a function of (seed, epoch): the loader's sample order and
augmentation via set_epoch, dropout/drop-path via the torch seed set at the start of each epoch. So
a run resumed from last.pt ends with the same weights as one that never stopped (on CPU; CUDA kernels
are not bitwise deterministic).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from cornpipe.errors import NonFiniteLoss
from cornpipe.models.finetune import set_trunk_frozen, trunk_norms_eval
from cornpipe.runs.build import amp_dtype, runtime
from cornpipe.runs.calibration import calibrate_run
from cornpipe.runs.checkpoint import BEST, LAST, save_checkpoint
from cornpipe.runs.config import TrainConfig, write_config_json
from cornpipe.runs.console import BatchProgress, OnBatches, log_console
from cornpipe.runs.distributed import (
    DistContext,
    barrier,
    broadcast_buffers,
    broadcast_value,
    env_context,
    gather_outputs,
    name_failure,
    shutdown,
    unwrap,
)
from cornpipe.runs.distributed import init as init_distributed
from cornpipe.runs.early_stopping import monitor_value
from cornpipe.runs.ema import ModelEma
from cornpipe.runs.environment import environment
from cornpipe.runs.epoch_metrics import Collector, TimedBatches, summarize
from cornpipe.runs.evaluation import evaluate, write_predictions
from cornpipe.runs.optim import FiniteWatch, base_lr, optimizer_step, scheduled_lr, set_lr
from cornpipe.runs.report import (
    CONFIG_FILE,
    METRICS_FILE,
    format_epoch_line,
    format_epoch_table,
    write_report,
)
from cornpipe.runs.run_dir import TrainResult, hold_run_dir, read_metrics, restore_best_and_report
from cornpipe.runs.session import Session, setup, step_and_eval_models
from cornpipe.runs.tracking import check_logger, epoch_logger, set_deterministic


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def train_one_epoch(model: nn.Module, loader: Any, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, ema: ModelEma | None, cfg: TrainConfig, *,
                    epoch: int, steps: int, last_good: str, progress: Progress, task: Any) -> dict[str, Any]:
    """One pass over the training loader; returns predictions, mean losses and timing."""
    model.train()
    if cfg.freeze_bn or epoch < cfg.freeze_epochs:
        trunk_norms_eval(model)  # a frozen (or --freeze-bn) trunk keeps its BatchNorm statistics
    device = torch.device(cfg.device)
    dtype = amp_dtype(cfg.amp)
    raw_model = unwrap(model)  # EMA and grad clipping see the plain module (under compile and DDP)
    collected = Collector(device)
    timed = TimedBatches(loader, steps, device)
    watch = FiniteWatch(device)
    for step, batch in enumerate(timed):
        lr = scheduled_lr(cfg, epoch * steps + step, steps)
        if lr is not None:
            set_lr(optimizer, lr)  # the trunk's groups at lr * trunk_lr_scale
        images = batch.images  # (B, 3, H, W), normalised, on the device, in the memory format cfg chose
        outputs, loss, parts = optimizer_step(model, raw_model, images, batch.position, batch.grade,
                                              loss_fn, optimizer, scaler, dtype, cfg.grad_clip, watch=watch)
        if ema is not None:
            ema.update(raw_model)
        collected.add(outputs, batch.position, batch.grade, batch.sample_id, loss, parts)
        if (bad := watch.first_bad()) is not None:  # read every few steps: no device sync per step
            raise NonFiniteLoss(epoch + 1, bad + 1, collected.sample_id[bad].tolist(), last_good)
        progress.update(task, advance=1, ips=collected.images / timed.elapsed())
    if (bad := watch.first_bad(final=True)) is not None:
        raise NonFiniteLoss(epoch + 1, bad + 1, collected.sample_id[bad].tolist(), last_good)
    return {**collected.arrays(), **timed.finish(), "images": collected.images}


def train(cfg: TrainConfig, *, resume: bool = False, force: bool = False,
          console: Console | None = None, verbose: bool = False, allow_new_shards: bool = False,
          results: Console | None = None, on_batches: OnBatches | None = None) -> TrainResult:
    """Run (or resume) a training run as configured; see the module docstring for what it writes.

    `console` (stderr) gets one line per epoch (and a progress bar on a terminal; `on_batches` the same
    counts), `results` (stdout) the last epoch's full table and the best epoch (runs.console); `verbose`
    prints the full table every epoch instead. A resumed run refuses a shard set other
    than its own (manifest sha256, counts) unless `allow_new_shards`.

    Under torchrun every process calls this: it joins the process group (NCCL on CUDA, gloo on the CPU),
    trains its shard of each epoch under DistributedDataParallel, and only rank 0 writes the run
    directory. An error on one rank is re-worded `rank R of W: <cause>` and ends that process; torchrun
    then stops the others (see cornpipe.runs.distributed)."""
    ctx = env_context()
    try:
        cfg = runtime(cfg)
        check_logger(cfg)  # a missing tracker package fails before any work
        deterministic = set_deterministic(cfg)  # before the first cuBLAS call
        if ctx.enabled:
            cfg = dataclasses.replace(cfg, device=init_distributed(ctx, cfg.device, cfg.dist_timeout))
        if not ctx.is_main:  # rank 0 speaks for the group
            console = results = log_console(stderr=True, quiet=True)
        console = console or log_console(stderr=True)
        results = results or log_console(stderr=False)
        if deterministic:
            console.print(deterministic, soft_wrap=True)  # one line, even in a narrow log
        # one writer per run folder (rank 0 writes it): a second `train --resume RUN` is refused
        held = hold_run_dir(Path(cfg.out), resume=resume, force=force, log=console.print,
                            inputs=(cfg.shards, cfg.init_weights)) if ctx.is_main else nullcontext()
        with held:
            result = _train(cfg, ctx, resume=resume, force=force, console=console, verbose=verbose,
                            allow_new_shards=allow_new_shards, results=results, on_batches=on_batches)
    except Exception as exc:
        name_failure(ctx, exc)
        raise
    shutdown(ctx)
    return result


def _train(cfg: TrainConfig, ctx: DistContext, *, resume: bool, force: bool, console: Console, verbose: bool,
           allow_new_shards: bool, results: Console, on_batches: OnBatches | None) -> TrainResult:
    s = setup(cfg, ctx, resume=resume, force=force, console=console, allow_new_shards=allow_new_shards)
    try:
        epochs_run = fit(s, console, verbose, results, on_batches)
    except NonFiniteLoss:
        if ctx.is_main and (s.out / METRICS_FILE).is_file() and (s.out / METRICS_FILE).stat().st_size:
            write_report(s.out)
        raise
    finally:
        for loader in (s.train_loader, s.val_loader):
            loader.close()
    barrier(ctx)  # rank 0's last checkpoint is on disk before any rank reads best.pt
    if ctx.is_main:  # the best epoch's per-sample predictions (kept in best.pt), before the report reads them
        write_predictions(s.out, s.shards.manifest["samples"])
        calibrate_run(s.out)  # T for predict/evaluate/export, fitted on best.pt's validation predictions
    return restore_best_and_report(s.out, cfg, s.model, s.ema, s.stopper, results, epochs_run=epochs_run,
                                   report=ctx.is_main)


def fit(s: Session, console: Console, verbose: bool, results: Console, on_batches: OnBatches | None = None) -> int:
    """The epochs, from last.pt's (or 0) to cfg.epochs or early stopping; returns the epochs run."""
    cfg, ctx, out = s.cfg, s.ctx, s.out
    start_epoch = s.restore()
    if start_epoch:
        console.print(f"resuming at epoch {start_epoch + 1} of {cfg.epochs} (after {out / LAST})")
    if ctx.is_main:
        write_config_json(cfg, out / CONFIG_FILE, {"data": {**s.data, "world_size": ctx.world_size},
                                                    "environment": environment(s.run.device)})
    if s.run.device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic  # fixed input size: the fastest kernels
    step_model, eval_model = step_and_eval_models(s)
    train_steps = int(min(len(s.train_loader), cfg.max_batches or math.inf))
    val_steps = int(min(len(s.val_loader), cfg.max_val_batches or math.inf))  # val is in class order: all of it
    by = f" by {cfg.oversample_by}" if cfg.oversample != "none" and cfg.oversample_by != "position" else ""
    ranks = (f", {ctx.world_size} ranks x batch {cfg.batch_size} = global batch "
             f"{ctx.world_size * cfg.batch_size}" if ctx.enabled else "")
    console.print(f"training {cfg.model} on {cfg.shards} ({s.data['counts']['train']} train / "
                  f"{s.data['counts']['val']} val) -> {out}  [device {cfg.device}, amp {cfg.amp}, "
                  f"compile {cfg.compile}, channels_last {cfg.channels_last}, threads {torch.get_num_threads()}, "
                  f"loader {cfg.loader}, oversample {cfg.oversample}{by}{ranks}]")
    previous = ([None] + read_metrics(out / METRICS_FILE))[-1] if ctx.is_main else None
    previous_record = None  # the epoch before `previous`, for the closing table
    epoch = start_epoch
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[ips]:>7.1f} img/s"), TimeRemainingColumn())
    with (BatchProgress(*columns, console=console, disable=not console.is_terminal, on_batches=on_batches) as progress,
          epoch_logger(cfg, out, s.data["positions"], start_epoch=start_epoch, enabled=ctx.is_main) as log_epoch):
        epochs_task = progress.add_task("epochs", total=cfg.epochs, completed=start_epoch, ips=0.0)
        progress.reported = batch_task = progress.add_task("train", total=train_steps, ips=0.0)
        for epoch in range(start_epoch, cfg.epochs):
            if s.stopper.should_stop:
                break
            torch.manual_seed(epoch_seed(cfg.seed, epoch))  # dropout, drop-path, on-device augmentation
            set_trunk_frozen(s.model, epoch < cfg.freeze_epochs)  # heads only for the first freeze_epochs
            s.train_loader.set_epoch(epoch)
            epoch_start = time.perf_counter()
            progress.reset(batch_task, total=train_steps, description=f"train {epoch + 1}/{cfg.epochs}", ips=0.0)
            train_out = train_one_epoch(step_model, s.train_loader, s.run.loss_fn, s.optimizer, s.scaler, s.ema,
                                        cfg, epoch=epoch, steps=train_steps, progress=progress, task=batch_task,
                                        last_good=str(out / LAST) if epoch > 0 else "none")
            progress.reset(batch_task, total=val_steps, description=f"val {epoch + 1}/{cfg.epochs}", ips=0.0)
            broadcast_buffers(ctx, unwrap(eval_model))  # every rank validates rank 0's model
            val_out = evaluate(eval_model, s.val_loader, s.run.loss_fn, cfg, steps=val_steps,
                               progress=progress, task=batch_task)
            record, val_out = epoch_record(s, epoch, train_out, val_out, epoch_start)
            if ctx.is_main:
                with (out / METRICS_FILE).open("a") as f:
                    f.write(json.dumps(record) + "\n")
                log_epoch(record)  # --log: the same numbers to TensorBoard
            print_epoch(progress.console, record, previous, verbose, cfg.epochs)
            previous_record, previous = previous, record
            if ctx.is_main:
                checkpoint_state = s.state(epoch + 1, record["val"], val_out)
                if record["best"]:
                    save_checkpoint(checkpoint_state, out / BEST)
                save_checkpoint(checkpoint_state, out / LAST)
            progress.update(epochs_task, advance=1, ips=record["train"]["images_per_s"])
        else:
            epoch = cfg.epochs
    if not verbose and previous is not None and epoch > start_epoch:
        results.print(format_epoch_table(previous, previous_record))  # the last epoch, against the one before
    return epoch


def epoch_record(s: Session, epoch: int, train_out: dict[str, Any], val_out: dict[str, Any],
                 epoch_start: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics.jsonl's line for the epoch, the gathered val predictions); steps early stopping and the plateau."""
    cfg, ctx = s.cfg, s.ctx
    # every rank gets every rank's predictions (val back in row order): same metrics everywhere
    train_out = gather_outputs(ctx, train_out)
    val_out = gather_outputs(ctx, val_out, rows=s.val_loader.indices())
    train_m = summarize(train_out, cfg, s.data, bootstrap=0)
    val_m = summarize(val_out, cfg, s.data, bootstrap=cfg.bootstrap)
    # rank 0's number decides best.pt, the plateau and early stopping for the whole group
    value = broadcast_value(ctx, monitor_value(val_m, cfg.monitor, s.data["grade_scale"],
                                                    s.data["tasks"]["monitor_ignores"]))
    improved = s.stopper.step(value, epoch + 1)
    record = {"epoch": epoch + 1, "lr": base_lr(s.optimizer), "time_s": time.perf_counter() - epoch_start, "train": train_m, "val": val_m,
              "monitor": value if math.isfinite(value) else None, "best": improved}
    if s.plateau is not None and epoch >= cfg.warmup_epochs:
        s.plateau.step(value)  # warm-up owns the lr until it ends
    return record, val_out


def print_epoch(console: Console, record: dict[str, Any], previous: dict[str, Any] | None, verbose: bool,
                epochs: int) -> None:
    if verbose:  # the team's full table, every epoch
        console.print(format_epoch_table(record, previous))
        if record["val"]["never_predicted"]:
            console.print(f"WARNING: position class(es) never predicted on val "
                          f"in epoch {record['epoch']}: {', '.join(record['val']['never_predicted'])}",
                          style="bold red")
    else:  # one line an epoch; the table comes once, at the end, and in report.md
        console.print(format_epoch_line(record, epochs), markup=False, highlight=False,
                      soft_wrap=True)  # one line, even in a narrow log


if __name__ == "__main__":  # `python -m cornpipe.train ARGS` is `python -m cornpipe train ARGS`: the package's entry
    import runpy
    import sys

    sys.argv[1:1] = ["train"]
    runpy.run_module("cornpipe", run_name="__main__", alter_sys=True)
