"""Train ResNet-Plus on a cornpipe shard set: position (classification) + grade (regression).

    cornpipe train SHARDS --out RUN [options]     (same as: python -m cornpipe.train SHARDS --out RUN ...)
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

Read top to bottom: train_one_epoch (its step is cornpipe.runs.optim.optimizer_step), then train() with
the one loop; validation (evaluate, evaluate_checkpoint, the predictions file) is cornpipe.runs.evaluation.

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
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from cornpipe.errors import ConfigError, NonFiniteLoss
from cornpipe.loaders import make_loader
from cornpipe.loaders.base import IMAGENET, Normalization
from cornpipe.models import create_model, input_stats
from cornpipe.models.finetune import set_trunk_frozen, trunk_norms_eval
from cornpipe.models.init_weights import load_init_weights
from cornpipe.models.losses import MultiTaskLoss
from cornpipe.runs.checkpoint import (
    BEST,
    CHECKPOINT_FORMAT,
    LAST,
    load_checkpoint,
    rng_state,
    save_checkpoint,
)
from cornpipe.runs.config import TrainConfig, resolve_runtime, write_config_json
from cornpipe.runs.cv import fold_ids
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
from cornpipe.runs.epoch_metrics import Collector, summarize
from cornpipe.runs.evaluation import amp_dtype, evaluate, prediction_tensors, write_predictions
from cornpipe.runs.optim import NonFiniteStep, base_lr, make_optimizer, optimizer_step, scheduled_lr, set_lr
from cornpipe.runs.report import (
    CONFIG_FILE,
    METRICS_FILE,
    format_epoch_line,
    format_epoch_table,
    write_report,
)
from cornpipe.runs.run_dir import (
    TrainResult,
    check_resumed_shards,
    keep_metrics_until,
    prepare_run_dir,
    read_metrics,
    restore_best_and_report,
    shard_identity,
)
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
    dtype = amp_dtype(cfg)
    raw_model = unwrap(model)  # EMA and grad clipping see the plain module (under compile and DDP)
    collected = Collector(device)
    data_wait = 0.0
    start = time.perf_counter()
    batches = iter(loader)
    for step in range(steps):
        t0 = time.perf_counter()
        batch = next(batches, None)
        data_wait += time.perf_counter() - t0
        if batch is None:
            break
        lr = scheduled_lr(cfg, epoch * steps + step, steps)
        if lr is not None:
            set_lr(optimizer, lr)  # the trunk's groups at lr * trunk_lr_scale
        images = batch.images  # (B, 3, H, W), normalised, on the device, in the memory format cfg chose
        try:
            outputs, loss, parts = optimizer_step(model, raw_model, images, batch.position, batch.grade,
                                                  loss_fn, optimizer, scaler, dtype, cfg.grad_clip)
        except NonFiniteStep:
            raise NonFiniteLoss(epoch + 1, step + 1, batch.sample_id.tolist(), last_good) from None
        if ema is not None:
            ema.update(raw_model)
        collected.add(outputs, batch.position, batch.grade, batch.sample_id, loss, parts)
        progress.update(task, advance=1, ips=collected.images / (time.perf_counter() - start))
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync point: the clock below must include queued GPU work
    seconds = time.perf_counter() - start
    return {**collected.arrays(), "seconds": seconds, "images": collected.images, "data_wait_s": data_wait}


def train(cfg: TrainConfig, *, resume: bool = False, force: bool = False,
          console: Console | None = None, verbose: bool = False, allow_new_shards: bool = False) -> TrainResult:
    """Run (or resume) a training run as configured; see the module docstring for what it writes.

    The console gets one line per epoch (and a progress bar on a terminal), then the last epoch's full
    table; `verbose` prints the full table every epoch instead. A resumed run refuses a shard set other
    than its own (manifest sha256, counts) unless `allow_new_shards`.

    Under torchrun every process calls this: it joins the process group (NCCL on CUDA, gloo on the CPU),
    trains its shard of each epoch under DistributedDataParallel, and only rank 0 writes the run
    directory. An error on one rank is re-worded `rank R of W: <cause>` and ends that process; torchrun
    then stops the others (see cornpipe.runs.distributed)."""
    ctx = env_context()
    try:
        cfg = resolve_runtime(cfg, torch.cuda.is_available())
        if ctx.enabled:
            cfg = dataclasses.replace(cfg, device=init_distributed(ctx, cfg.device, cfg.dist_timeout))
        if not ctx.is_main:
            console = Console(stderr=True, quiet=True)  # rank 0 speaks for the group
        result = _train(cfg, ctx, resume=resume, force=force, console=console or Console(stderr=True),
                        verbose=verbose, allow_new_shards=allow_new_shards)
    except Exception as exc:
        name_failure(ctx, exc)
        raise
    shutdown(ctx)
    return result


def _train(cfg: TrainConfig, ctx: DistContext, *, resume: bool, force: bool, console: Console, verbose: bool,
           allow_new_shards: bool) -> TrainResult:
    device = torch.device(cfg.device)  # resolved by train(): for this rank under DDP
    run = Path(cfg.out)
    checkpoint = load_checkpoint(run / LAST) if resume else None
    if not Path(cfg.shards).is_dir():
        raise ConfigError(f"shard set directory not found: {cfg.shards}")
    shards = ShardSet(cfg.shards)
    data = {"positions": list(shards.positions), "grade_scale": [float(g) for g in shards.grade_scale],
            "shards": str(cfg.shards), "counts": {s: shards.count(s) for s in ("train", "val")},
            "convert": {k: shards.params.get(k) for k in ("write_mode", "max_resolution", "jpeg_quality")}}
    fold = fold_ids(shards.manifest["samples"], cfg)  # None: the convert-time train/val split
    if fold is not None:  # a cross-validation fold over all samples, whichever split holds them
        data["counts"] = {"train": len(fold[0]), "val": len(fold[1])}
        data["fold"] = {"name": fold[2], "folds": cfg.folds, "fold": cfg.fold, "group": cfg.fold_group,
                        "seed": cfg.fold_seed}
    data["identity"] = shard_identity(cfg.shards, data["counts"])  # what --resume must find again
    if checkpoint and (checkpoint["data"]["positions"] != data["positions"]
                       or checkpoint["data"]["grade_scale"] != data["grade_scale"]):
        raise ConfigError(f"{cfg.shards} has other position classes or grade scale than the run in {run}")
    if checkpoint:
        data["shard_changes"] = list(checkpoint["data"].get("shard_changes", []))
        change = check_resumed_shards(checkpoint["data"], data, run, cfg.shards, allow_new_shards)
        if change is not None:
            data["shard_changes"].append({**change, "at_epoch": checkpoint["epoch"]})
            console.print(f"[bold yellow]resuming on another shard set ({change['summary']}): "
                          f"--allow-new-shards; the report says so")
    if not resume:
        prepare_run_dir(run, force, dry_run=True)  # refuse a used --out before any slow work
    if cfg.verify and ctx.is_main:  # flipped bytes or an edited label must not train silently
        # (`--no-verify` skips; one rank reads the files: a failure there ends the group like any other)
        checked = check_shards(cfg.shards)
        unchecked = "" if checked["manifest_hashed"] else "; not manifest.json (a version 1 set without manifest.sha256)"
        console.print(f"checked {cfg.shards}: {checked['files']} files, sizes"
                      f"{' and sha256' if checked['hashed'] else ' (over 2 GB: sha256 left to cornpipe verify)'}"
                      f" in {checked['seconds']:.1f} s{unchecked}", soft_wrap=True)

    # model, loss, optimiser and the rest of the state a checkpoint carries
    torch.manual_seed(cfg.seed)  # initial weights
    model = create_model(cfg.model, num_positions=len(data["positions"]), grade_scale=data["grade_scale"],
                         grade_head=cfg.grade_head, drop_path=cfg.drop_path,
                         pretrained=cfg.pretrained and not resume)  # a resumed run's weights are in last.pt
    if cfg.init_weights and not resume:
        init = load_init_weights(model, cfg.init_weights, allow_partial=cfg.allow_partial_init)
        console.print(init.line())
        data["init"] = init.to_dict()  # config.json and every checkpoint say what the run started from
    elif checkpoint and "init" in checkpoint["data"]:
        data["init"] = checkpoint["data"]["init"]
    model = model.to(device)
    if cfg.sync_bn and ctx.enabled:
        if device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA (torch's SyncBatchNorm is GPU-only); on the CPU each "
                              "rank keeps its own BatchNorm statistics")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # before DDP, as torch's docs say
    norm = IMAGENET
    stats = input_stats(model)
    if stats is not None:  # a pretrained trunk: normalise as its weights expect
        norm = Normalization.from_unit(*stats)
        if norm != IMAGENET:
            console.print(f"{cfg.model} expects inputs normalised with mean {stats[0]} and std {stats[1]} "
                          f"(0-1 scale), not ImageNet's: the loaders use the trunk's")
    data["normalization"] = norm.to_dict()  # predict normalises the same way
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema else None
    loss_fn = MultiTaskLoss(weights=cfg.loss_weights, label_smoothing=cfg.label_smoothing,
                            grade_scale=data["grade_scale"], grade_head=cfg.grade_head)
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience,
        threshold=cfg.min_delta, threshold_mode="abs", min_lr=cfg.min_lr)
        if cfg.schedule == "plateau" else None)
    stopper = EarlyStopping(cfg.patience, cfg.min_delta)

    # data: the train split drawn per epoch (oversampling, augmentation), val in fixed order
    # device, dtype and memory format are the run's (resolve_runtime), not re-derived by the loader
    # under DDP each rank reads its own slice of every epoch: the train draw truncated to a multiple of
    # the world size (`even`) so every rank runs the same number of steps, val split into disjoint,
    # unpadded shards (every image evaluated exactly once; predictions gathered below)
    if ctx.enabled and data["counts"]["val"] < ctx.world_size:
        raise ConfigError(f"the val split has {data['counts']['val']} image(s), fewer than the "
                          f"{ctx.world_size} ranks: use fewer processes")
    loader_args = dict(backend=cfg.loader, batch_size=cfg.batch_size, image_size=cfg.image_size,
                       device=cfg.device, seed=cfg.seed, workers=cfg.workers, channels_last=cfg.channels_last,
                       normalization=norm, rank=ctx.rank, world_size=ctx.world_size,
                       dtype=torch.float32 if cfg.amp == "off" else None)
    train_loader = make_loader(shards, "train", oversample=cfg.oversample, even=True,
                               sample_ids=fold[0] if fold else None,
                               drop_last=data["counts"]["train"] // ctx.world_size > cfg.batch_size, **loader_args)
    val_loader = make_loader(shards, "val", oversample="none", shuffle=False, sample_ids=fold[1] if fold else None,
                             **loader_args)
    cap = cfg.max_batches or math.inf
    train_steps, val_steps = int(min(len(train_loader), cap)), int(min(len(val_loader), cap))
    barrier(ctx)  # every rank has checked --out before rank 0 touches it
    if not resume and ctx.is_main:
        prepare_run_dir(run, force)

    try:
        start_epoch = 0
        if checkpoint:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            if checkpoint["scaler"] and scaler.is_enabled():
                scaler.load_state_dict(checkpoint["scaler"])
            if plateau and checkpoint["scheduler"]:
                plateau.load_state_dict(checkpoint["scheduler"])
            if ema and checkpoint["ema"]:
                ema.load_state_dict(checkpoint["ema"])
            stopper.load_state_dict(checkpoint["early_stopping"])
            start_epoch = checkpoint["epoch"]
            if ctx.is_main:
                keep_metrics_until(run / METRICS_FILE, start_epoch)  # drop lines of an epoch after last.pt
        if ctx.is_main:
            write_config_json(cfg, run / CONFIG_FILE, {"data": {**data, "world_size": ctx.world_size}})

        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
        ddp_model: nn.Module = model  # `model` stays the plain module: checkpoints hold no `module.` prefix
        if ctx.enabled:
            ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.freeze_epochs > 0)  # a frozen trunk sends no gradients
        step_model = torch.compile(ddp_model) if cfg.compile else ddp_model  # torch's docs: compile the DDP model
        # validation runs on each rank's own shard, outside DDP (whose forward may run collectives)
        eval_model = step_model if not ctx.enabled else torch.compile(model) if cfg.compile else model
        if ema is not None:  # the EMA weights when kept: they are what best.pt and predict use
            eval_model = torch.compile(ema.module) if cfg.compile else ema.module

        def state(epoch: int, val: dict[str, Any], val_out: dict[str, Any]) -> dict[str, Any]:
            return {"format": CHECKPOINT_FORMAT, "epoch": epoch, "config": cfg.to_dict(), "data": data,
                    "model": model.state_dict(), "ema": ema.state_dict() if ema else None,
                    "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "scheduler": plateau.state_dict() if plateau else None,
                    "early_stopping": stopper.state_dict(), "rng": rng_state(), "val": val,
                    "val_predictions": prediction_tensors(val_out)}  # best.pt's: RUN/val_predictions.csv

        ranks = (f", {ctx.world_size} ranks x batch {cfg.batch_size} = global batch "
                 f"{ctx.world_size * cfg.batch_size}" if ctx.enabled else "")
        console.print(f"training {cfg.model} on {cfg.shards} ({data['counts']['train']} train / "
                      f"{data['counts']['val']} val) -> {run}  [device {cfg.device}, amp {cfg.amp}, "
                      f"compile {cfg.compile}, loader {cfg.loader}, oversample {cfg.oversample}{ranks}]")
        previous = ([None] + read_metrics(run / METRICS_FILE))[-1] if ctx.is_main else None
        previous_record = None  # the epoch before `previous`, for the closing table
        epoch = start_epoch
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[ips]:>7.1f} img/s"), TimeRemainingColumn())
        with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
            epochs_task = progress.add_task("epochs", total=cfg.epochs, completed=start_epoch, ips=0.0)
            batch_task = progress.add_task("train", total=train_steps, ips=0.0)
            for epoch in range(start_epoch, cfg.epochs):
                if stopper.should_stop:
                    break
                torch.manual_seed(epoch_seed(cfg.seed, epoch))  # dropout, drop-path, on-device augmentation
                set_trunk_frozen(model, epoch < cfg.freeze_epochs)  # heads only for the first freeze_epochs
                train_loader.set_epoch(epoch)
                epoch_start = time.perf_counter()
                progress.reset(batch_task, total=train_steps, description=f"train {epoch + 1}", ips=0.0)
                last_good = str(run / LAST) if epoch > 0 else "none"
                train_out = train_one_epoch(step_model, train_loader, loss_fn, optimizer, scaler, ema, cfg,
                                            epoch=epoch, steps=train_steps, last_good=last_good,
                                            progress=progress, task=batch_task)
                progress.reset(batch_task, total=val_steps, description=f"val {epoch + 1}", ips=0.0)
                broadcast_buffers(ctx, unwrap(eval_model))  # every rank validates rank 0's model
                val_out = evaluate(eval_model, val_loader, loss_fn, cfg, steps=val_steps,
                                   progress=progress, task=batch_task)
                # every rank gets every rank's predictions (val back in row order): same metrics everywhere
                train_out = gather_outputs(ctx, train_out)
                val_out = gather_outputs(ctx, val_out, rows=val_loader.indices())
                train_m = summarize(train_out, cfg, data, bootstrap=0)
                val_m = summarize(val_out, cfg, data, bootstrap=cfg.bootstrap)
                # rank 0's number decides best.pt, the plateau and early stopping for the whole group
                value = broadcast_value(ctx, monitor_value(val_m, cfg.monitor, data["grade_scale"]))
                improved = stopper.step(value, epoch + 1)
                record = {"epoch": epoch + 1, "lr": base_lr(optimizer),
                          "time_s": time.perf_counter() - epoch_start, "train": train_m, "val": val_m,
                          "monitor": value if math.isfinite(value) else None, "best": improved}
                if plateau is not None and epoch >= cfg.warmup_epochs:
                    plateau.step(value)  # warm-up owns the lr until it ends
                if ctx.is_main:
                    with (run / METRICS_FILE).open("a") as f:
                        f.write(json.dumps(record) + "\n")
                if verbose:  # the team's full table, every epoch
                    progress.console.print(format_epoch_table(record, previous))
                    if val_m["never_predicted"]:
                        progress.console.print(f"[bold red]WARNING: position class(es) never predicted on val "
                                               f"in epoch {epoch + 1}: {', '.join(val_m['never_predicted'])}")
                else:  # one line an epoch; the table comes once, at the end, and in report.md
                    progress.console.print(format_epoch_line(record, cfg.epochs), markup=False, highlight=False,
                                           soft_wrap=True)  # one line, even in a narrow log
                previous_record, previous = previous, record
                if ctx.is_main:
                    checkpoint_state = state(epoch + 1, val_m, val_out)
                    if improved:
                        save_checkpoint(checkpoint_state, run / BEST)
                    save_checkpoint(checkpoint_state, run / LAST)
                progress.update(epochs_task, advance=1, ips=train_m["images_per_s"])
            else:
                epoch = cfg.epochs
        if not verbose and previous is not None and epoch > start_epoch:
            console.print(format_epoch_table(previous, previous_record))  # the last epoch, against the one before
    except NonFiniteLoss:
        if ctx.is_main and (run / METRICS_FILE).is_file() and (run / METRICS_FILE).stat().st_size:
            write_report(run)
        raise
    finally:
        for loader in (train_loader, val_loader):
            loader.close()

    barrier(ctx)  # rank 0's last checkpoint is on disk before any rank reads best.pt
    result = restore_best_and_report(run, cfg, model, ema, stopper, console, epochs_run=epoch, report=ctx.is_main)
    if ctx.is_main:  # the best epoch's per-sample predictions, gathered from every rank, kept in best.pt
        write_predictions(run, shards.manifest["samples"])
    return result


if __name__ == "__main__":  # `python -m cornpipe.train ...` is `cornpipe train ...` (options live in the CLI)
    import sys

    from cornpipe.cli.runs import train_command

    train_command.main(sys.argv[1:], prog_name="python -m cornpipe.train")
