"""A training process's session: everything `train` sets up before its first epoch, in one object.

`setup` resolves the run (cornpipe.runs.build), checks the shard set and --out, plans the tasks, makes the
optimiser, scaler, schedule, early stopping and the loaders, and returns a `Session` that train.py's loop
reads; `Session.state` is what every checkpoint holds and `Session.restore` loads a resumed run's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from cornpipe.errors import ConfigError
from cornpipe.loaders import make_loader
from cornpipe.loaders.base import IMAGENET
from cornpipe.loaders.cells import check_keys
from cornpipe.models import input_stats
from cornpipe.models.init_weights import load_init_weights
from cornpipe.runs.build import Fold, Run, build_run, run_fold
from cornpipe.runs.checkpoint import CHECKPOINT_FORMAT, LAST, load_weights, resume_state, rng_state
from cornpipe.runs.config import TrainConfig
from cornpipe.runs.distributed import DistContext, barrier
from cornpipe.runs.early_stopping import EarlyStopping
from cornpipe.runs.ema import ModelEma
from cornpipe.runs.environment import environment
from cornpipe.runs.evaluation import prediction_tensors
from cornpipe.runs.optim import make_optimizer
from cornpipe.runs.report import METRICS_FILE
from cornpipe.runs.run_dir import (
    check_epochs,
    check_resumed_config,
    check_resumed_shards,
    keep_metrics_until,
    prepare_run_dir,
    shard_identity,
)
from cornpipe.runs.tasks import run_tasks
from cornpipe.shards.inspect import check_shards
from cornpipe.shards.shard_set import ShardSet


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
    check_keys(cfg.oversample_by.split(","), shards.manifest["samples"])  # before the model is built
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
