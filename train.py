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

Read top to bottom: train_one_epoch (its step is cornpipe.runs.optim.optimizer_step), train(), setup()
(the run itself comes from cornpipe.runs.build), then fit() with the one loop; validation (evaluate,
evaluate_checkpoint, the predictions file) is cornpipe.runs.evaluation.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from cornpipe.errors import ConfigError, NonFiniteLoss
from cornpipe.loaders import make_loader
from cornpipe.loaders.base import IMAGENET
from cornpipe.models import input_stats
from cornpipe.models.finetune import set_trunk_frozen, trunk_norms_eval
from cornpipe.models.init_weights import load_init_weights
from cornpipe.runs.build import Fold, Run, amp_dtype, build_run, run_fold, runtime
from cornpipe.runs.calibration import calibrate_run
from cornpipe.runs.checkpoint import (
    BEST,
    CHECKPOINT_FORMAT,
    LAST,
    load_weights,
    resume_state,
    rng_state,
    save_checkpoint,
)
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
from cornpipe.runs.early_stopping import EarlyStopping, monitor_value
from cornpipe.runs.ema import ModelEma
from cornpipe.runs.environment import environment
from cornpipe.runs.epoch_metrics import Collector, TimedBatches, summarize
from cornpipe.runs.evaluation import evaluate, prediction_tensors, write_predictions
from cornpipe.runs.optim import FiniteWatch, base_lr, make_optimizer, optimizer_step, scheduled_lr, set_lr
from cornpipe.runs.report import (
    CONFIG_FILE,
    METRICS_FILE,
    format_epoch_line,
    format_epoch_table,
    write_report,
)
from cornpipe.runs.run_dir import (
    TrainResult,
    check_epochs,
    check_resumed_config,
    check_resumed_shards,
    hold_run_dir,
    keep_metrics_until,
    prepare_run_dir,
    read_metrics,
    restore_best_and_report,
    shard_identity,
)
from cornpipe.runs.tasks import run_tasks
from cornpipe.runs.tracking import check_logger, epoch_logger, set_deterministic
from cornpipe.shards.inspect import check_shards
from cornpipe.shards.shard_set import ShardSet


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


@dataclass
class Session:
    """One training process's run, built by `setup` and read by `fit`: what a checkpoint carries, and the loaders."""

    cfg: TrainConfig  # resolved; device: this rank's
    ctx: DistContext
    out: Path  # the run directory
    shards: ShardSet
    data: dict[str, Any]  # positions, grade scale, counts, fold, normalisation...: config.json's and every checkpoint's
    run: Run
    model: nn.Module  # the plain module: checkpoints hold no `module.` prefix
    ema: ModelEma | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None
    stopper: EarlyStopping
    train_loader: Any
    val_loader: Any
    checkpoint: dict[str, Any] | None  # last.pt when resuming

    def state(self, epoch: int, val: dict[str, Any], val_out: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint after `epoch` epochs."""
        return {"format": CHECKPOINT_FORMAT, "epoch": epoch, "config": self.cfg.to_dict(), "data": self.data,
                "model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "scheduler": self.plateau.state_dict() if self.plateau else None,
                "environment": environment(self.run.device),  # what wrote it: versions, device, git revision
                "early_stopping": self.stopper.state_dict(), "rng": rng_state(), "val": val,
                "val_predictions": prediction_tensors(val_out)}  # best.pt's: RUN/val_predictions.csv

    def restore(self) -> int:
        """Load a resumed run's state from last.pt; the epoch to start from."""
        checkpoint = self.checkpoint
        if not checkpoint:
            return 0
        load_weights(self.model, checkpoint["model"], self.out / LAST, self.cfg.model)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.plateau and checkpoint["scheduler"]:
            self.plateau.load_state_dict(checkpoint["scheduler"])
        if self.ema and checkpoint["ema"]:
            self.ema.load_state_dict(checkpoint["ema"])
        self.stopper.load_state_dict(checkpoint["early_stopping"])
        if self.ctx.is_main:
            keep_metrics_until(self.out / METRICS_FILE, checkpoint["epoch"])  # drop lines of an epoch after last.pt
        return checkpoint["epoch"]


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


def run_data(cfg: TrainConfig, shards: ShardSet, fold: Fold | None) -> dict[str, Any]:
    """What config.json and every checkpoint say about the data: classes, scale, counts, fold, identity."""
    data = {"positions": list(shards.positions), "grade_scale": [float(g) for g in shards.grade_scale],
            "shards": str(cfg.shards), "counts": {s: shards.count(s) for s in ("train", "val")},
            "convert": {k: shards.params.get(k) for k in ("write_mode", "max_resolution", "jpeg_quality")}}
    if fold is not None:  # a cross-validation fold over all samples, whichever split holds them
        data["counts"] = {"train": len(fold.train_ids), "val": len(fold.val_ids)}
        data["fold"] = {"name": fold.name, "folds": cfg.folds, "fold": cfg.fold, "group": cfg.fold_group,
                        "seed": cfg.fold_seed}
    data["identity"] = shard_identity(cfg.shards, data["counts"])  # what --resume must find again
    return data


def check_resumed(checkpoint: dict[str, Any], data: dict[str, Any], cfg: TrainConfig, allow_new_shards: bool,
                  console: Console) -> None:
    """A resumed run keeps its classes and scale; another shard set only with --allow-new-shards, logged."""
    run = Path(cfg.out)
    if checkpoint["data"]["positions"] != data["positions"] or checkpoint["data"]["grade_scale"] != data["grade_scale"]:
        raise ConfigError(f"{cfg.shards} has other position classes or grade scale than the run in {run}")
    data["shard_changes"] = list(checkpoint["data"].get("shard_changes", []))
    change = check_resumed_shards(checkpoint["data"], data, run, cfg.shards, allow_new_shards)
    if change is not None:
        data["shard_changes"].append({**change, "at_epoch": checkpoint["epoch"]})
        console.print(f"resuming on another shard set ({change['summary']}): "
                      f"--allow-new-shards; the report says so", style="bold yellow")


def setup(cfg: TrainConfig, ctx: DistContext, *, resume: bool, force: bool, console: Console,
          allow_new_shards: bool) -> Session:
    """Everything before the first epoch, cheap checks first: the shard set, --out, the run (runs.build), the
    optimiser and the rest of the state a checkpoint carries, the loaders; then the run directory."""
    out = Path(cfg.out)
    checkpoint = resume_state(out, log=console.print if ctx.is_main else None) if resume else None
    if checkpoint:
        check_resumed_config(checkpoint["config"], cfg, out)
        check_epochs(cfg, checkpoint["epoch"], out)
    if not Path(cfg.shards).is_dir():
        raise ConfigError(f"shard set directory not found: {cfg.shards}")
    shards = ShardSet(cfg.shards)
    fold = run_fold(cfg, shards.manifest["samples"])  # None: the convert-time train/val split
    data = run_data(cfg, shards, fold)
    cfg, tasks, said = run_tasks(cfg, shards.manifest["samples"], fold.train_ids if fold else None,
                                 checkpoint["data"] if checkpoint else None, data["positions"])
    data["tasks"] = tasks.to_dict()  # a task constant in the train split: weight 0, monitor without it
    for line in said:
        console.print(line, highlight=False, soft_wrap=True)
    if checkpoint:
        check_resumed(checkpoint, data, cfg, allow_new_shards, console)
    if not resume:
        prepare_run_dir(out, force, dry_run=True)  # refuse a used --out before any slow work
    if cfg.verify and ctx.is_main:  # flipped bytes or an edited label must not train silently
        # (`--no-verify` skips; one rank reads the files: a failure there ends the group like any other)
        checked = check_shards(cfg.shards)
        unchecked = "" if checked["manifest_hashed"] else "; not manifest.json (a version 1 set without manifest.sha256)"
        console.print(f"checked {cfg.shards}: {checked['files']} files, sizes"
                      f"{' and sha256' if checked['hashed'] else ' (over 2 GB: sha256 left to cornpipe verify)'}"
                      f" in {checked['seconds']:.1f} s{unchecked}", soft_wrap=True)

    torch.manual_seed(cfg.seed)  # initial weights
    run = build_run(cfg, data["positions"], data["grade_scale"], fold=fold,
                    pretrained=cfg.pretrained and not resume)  # a resumed run's weights are in last.pt
    if cfg.init_weights and not resume:
        init = load_init_weights(run.model, cfg.init_weights, allow_partial=cfg.allow_partial_init)
        console.print(init.line())
        data["init"] = init.to_dict()  # config.json and every checkpoint say what the run started from
    elif checkpoint and "init" in checkpoint["data"]:
        data["init"] = checkpoint["data"]["init"]
    if cfg.sync_bn and ctx.enabled:
        if run.device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA (torch's SyncBatchNorm is GPU-only); on the CPU each "
                              "rank keeps its own BatchNorm statistics")
        run = dataclasses.replace(run, model=nn.SyncBatchNorm.convert_sync_batchnorm(run.model))  # before DDP
    if run.normalization != IMAGENET:  # a pretrained trunk: normalise as its weights expect
        mean, std = input_stats(run.model)
        console.print(f"{cfg.model} expects inputs normalised with mean {mean} and std {std} "
                      f"(0-1 scale), not ImageNet's: the loaders use the trunk's")
    data["normalization"] = run.normalization.to_dict()  # predict normalises the same way
    model = run.model
    optimizer = make_optimizer(model, cfg)
    plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience,
        threshold=cfg.min_delta, threshold_mode="abs", min_lr=cfg.min_lr)
        if cfg.schedule == "plateau" else None)

    # data: the train split drawn per epoch, val in fixed order (runs.build); under DDP each rank reads its
    # own slice of every epoch, val in disjoint, unpadded shards (every image once; predictions gathered)
    if ctx.enabled and data["counts"]["val"] < ctx.world_size:
        raise ConfigError(f"the val split has {data['counts']['val']} image(s), fewer than the "
                          f"{ctx.world_size} ranks: use fewer processes")
    ranks = dict(rank=ctx.rank, world_size=ctx.world_size)
    train_loader = make_loader(shards, "train", **run.train_request(data["counts"]["train"], **ranks))
    val_loader = make_loader(shards, "val", **run.val_request(**ranks))
    barrier(ctx)  # every rank has checked --out before rank 0 touches it
    if not resume and ctx.is_main:
        prepare_run_dir(out, force)
    return Session(cfg=cfg, ctx=ctx, out=out, shards=shards, data=data, run=run, model=model,
                   ema=ModelEma(model, cfg.ema_decay) if cfg.ema else None, optimizer=optimizer,
                   scaler=torch.amp.GradScaler(run.device.type, enabled=cfg.amp == "fp16"), plateau=plateau,
                   stopper=EarlyStopping(cfg.patience, cfg.min_delta), train_loader=train_loader,
                   val_loader=val_loader, checkpoint=checkpoint)


def step_and_eval_models(s: Session) -> tuple[nn.Module, nn.Module]:
    """(the model the optimiser steps: DDP and/or compiled; the model validation runs: the EMA's when kept)."""
    cfg, ctx, model = s.cfg, s.ctx, s.model
    ddp_model: nn.Module = model
    if ctx.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[s.run.device.index] if s.run.device.type == "cuda" else None,
            find_unused_parameters=cfg.freeze_epochs > 0)  # a frozen trunk sends no gradients
    step_model = torch.compile(ddp_model) if cfg.compile else ddp_model  # torch's docs: compile the DDP model
    # validation runs on each rank's own shard, outside DDP (whose forward may run collectives)
    eval_model = step_model if not ctx.enabled else torch.compile(model) if cfg.compile else model
    if s.ema is not None:  # the EMA weights when kept: they are what best.pt and predict use
        eval_model = torch.compile(s.ema.module) if cfg.compile else s.ema.module
    return step_model, eval_model


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
    ranks = (f", {ctx.world_size} ranks x batch {cfg.batch_size} = global batch "
             f"{ctx.world_size * cfg.batch_size}" if ctx.enabled else "")
    console.print(f"training {cfg.model} on {cfg.shards} ({s.data['counts']['train']} train / "
                  f"{s.data['counts']['val']} val) -> {out}  [device {cfg.device}, amp {cfg.amp}, "
                  f"compile {cfg.compile}, channels_last {cfg.channels_last}, threads {torch.get_num_threads()}, "
                  f"loader {cfg.loader}, oversample {cfg.oversample}{ranks}]")
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
