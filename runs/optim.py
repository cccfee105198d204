"""The optimiser and its step, shared by the trainer and `cornpipe bench train`, and the lr shape."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cornpipe.runs.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, trunk_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only: never on norm scales/shifts or biases (ndim <= 1).

    The trunk's groups carry `lr_scale = trunk_lr_scale` (a pretrained trunk learns slower than the
    fresh heads); every lr the trainer sets is the schedule's lr times the group's lr_scale.
    """
    from cornpipe.models import trunk_and_head_parameters

    trunk, heads = trunk_and_head_parameters(model)
    groups = []
    for params, scale in ((trunk, trunk_lr_scale), (heads, 1.0)):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [{"params": decay, "weight_decay": weight_decay, "lr_scale": scale},
                   {"params": no_decay, "weight_decay": 0.0, "lr_scale": scale}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.trunk_lr_scale)  # no decay on norms and biases
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's lr (a group's lr divided by its lr_scale)."""
    group = optimizer.param_groups[-1]  # the heads' groups come last and are never scaled
    return group["lr"] / group.get("lr_scale", 1.0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to `lr` times its lr_scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def scheduled_lr(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float | None:
    """The learning rate this step sets, or None when the plateau schedule owns it (after warm-up).

    Warm-up: linear from lr/10 to lr over warmup_epochs, per step. Cosine: from lr down to min_lr over
    the remaining steps of `epochs`. A pure function of the step, so a resumed run matches.
    """
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg.lr * (0.1 + 0.9 * (step + 1) / warmup)
    if cfg.schedule == "plateau":
        return None
    total = max(cfg.epochs * steps_per_epoch - warmup, 1)
    progress = min((step - warmup) / total, 1.0)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class NonFiniteStep(Exception):
    """The loss (or, without a GradScaler, the gradient) of a step was NaN/inf; no update was made."""


FINITE_CHECK_STEPS = 50  # the trainer reads its non-finite flag every this many steps (and at the epoch's end)


class FiniteWatch:
    """The first step of an epoch whose loss (or gradient) was NaN/inf, kept on the device.

    Reading a flag every step is a device sync that stops the CPU from queueing the next step, so
    `optimizer_step` records into this instead and the trainer reads it every `every` steps and at
    the end of the epoch. Steps after a bad one still run (their results are never saved: the run
    stops at the read with the first bad step named).
    """

    def __init__(self, device: torch.device, every: int = FINITE_CHECK_STEPS) -> None:
        self.first = torch.full((), -1, dtype=torch.int64, device=device)  # -1: every step finite so far
        self.every, self.step = every, 0

    def record(self, finite: torch.Tensor) -> None:
        """Note this step's finiteness (a 0-d bool tensor) without reading it."""
        self.first = torch.where(finite | (self.first >= 0), self.first, self.step)
        self.step += 1

    def first_bad(self, final: bool = False) -> int | None:
        """The 0-based first bad step, read every `every` steps or when `final` (a device sync); else None."""
        if not final and self.step % self.every:
            return None
        first = int(self.first)
        return first if first >= 0 else None


def optimizer_step(model: nn.Module, raw_model: nn.Module, images: torch.Tensor, position: torch.Tensor,
                   grade: torch.Tensor, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, dtype: torch.dtype | None,
                   grad_clip: float, watch: FiniteWatch | None = None,
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """One training step (autocast forward, float32 loss, scaled backward, clipping, optimiser step):
    the trainer's and `cornpipe bench train`'s. Returns (outputs, loss, loss parts).

    Without `watch` a non-finite loss raises NonFiniteStep before the update (a device sync);
    with it the step is recorded there and nothing is read on the host."""
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        outputs = model(images)
    outputs = {k: v.float() for k, v in outputs.items()}  # the loss always runs in float32
    loss, parts = loss_fn(outputs, position, grade)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    grad_norm = None
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        grad_norm = nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    # With the fp16 GradScaler an inf gradient is expected now and then (the scaler skips that step
    # and lowers its scale), so only the loss is checked there; without a scaler the gradient too.
    finite = torch.isfinite(loss)
    if grad_norm is not None and not scaler.is_enabled():
        finite = finite & torch.isfinite(grad_norm)
    if watch is not None:
        watch.record(finite)
    elif not bool(finite):  # device sync point: this step's update never sees a NaN/inf loss
        raise NonFiniteStep
    scaler.step(optimizer)
    scaler.update()
    return outputs, loss, parts
