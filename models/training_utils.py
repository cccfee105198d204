"""Pieces of the training loop kept out of train.py: the optimiser and its step (shared with
`cornpipe bench train`), monitor, early stopping, EMA, lr shape.

Every piece's state is a dict of numbers/tensors so it fits in a weights_only checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from loaders.base import CornpipeError
from models.checkpoint import BEST, LAST, load_checkpoint
from models.config import ConfigError, TrainConfig
from models.metrics import compute_metrics
from models.report import CONFIG_FILE, CONFUSION_FILE, CURVES_FILE, METRICS_FILE, REPORT_FILE, write_report

RUN_FILES = (METRICS_FILE, CONFIG_FILE, BEST, LAST, REPORT_FILE, CURVES_FILE, CONFUSION_FILE)


class NonFiniteLoss(CornpipeError):
    """Training produced a NaN/inf loss or gradient; the run stops before stepping on it."""

    def __init__(self, epoch: int, batch: int, sample_ids: list[int], last_good: str) -> None:
        ids = ", ".join(str(i) for i in sample_ids)
        super().__init__(f"non-finite loss at epoch {epoch} batch {batch} (sample ids {ids}); "
                         f"last good checkpoint: {last_good}")
        self.epoch, self.batch, self.sample_ids = epoch, batch, sample_ids


def monitor_value(metrics: dict[str, Any], name: str, grade_scale: list[float]) -> float:
    """The monitored validation number, always "higher is better".

    `combined` = position macro-F1 - grade MAE / max(grade_scale): both terms are on a 0..1 scale,
    so a run cannot buy position F1 with a large grade error or the other way round.
    """
    if name == "combined":
        value = metrics["position_macro_f1"] - metrics["grade_mae"] / max(grade_scale)
    elif name in ("grade_mae", "loss"):
        value = -metrics[name]
    else:
        value = metrics[name]
    # undefined this epoch (e.g. QWK when every grade falls on one level): the worst possible value
    return float(value) if value is not None and math.isfinite(value) else -math.inf


class EarlyStopping:
    """Stop after `patience` epochs without a monitor gain larger than `min_delta`."""

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best = -math.inf
        self.best_epoch = 0  # 1-based; 0 = none yet
        self.bad_epochs = 0

    def step(self, value: float, epoch: int) -> bool:
        """Record this epoch's monitor; True when it is the new best."""
        if self.best_epoch == 0 or value > self.best + self.min_delta:  # epoch 1 is always a best
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


class ModelEma:
    """Exponential moving average of a model's parameters and buffers (timm ModelEmaV3 style).

    The decay is warmed up, min(decay, (1 + t) / (10 + t)) at update t, so that a short run on a
    small dataset (a handful of steps per epoch) still ends with weights near the trained ones.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_float, model_float = [], []
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if e.is_floating_point():
                ema_float.append(e)
                model_float.append(m.detach())
            else:  # e.g. BatchNorm's num_batches_tracked
                e.copy_(m)
        torch._foreach_lerp_(ema_float, model_float, 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only: never on norm scales/shifts or biases (ndim <= 1)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


class Collector:
    """Accumulates one epoch's predictions and losses on the device; one transfer at the end."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros(3, device=device)  # (total, position, grade) x batch size
        self.position_true: list[torch.Tensor] = []
        self.position_prob: list[torch.Tensor] = []
        self.grade_true: list[torch.Tensor] = []
        self.grade_pred: list[torch.Tensor] = []
        self.images = 0

    def add(self, outputs: dict[str, torch.Tensor], position: torch.Tensor, grade: torch.Tensor,
            loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        n = position.shape[0]
        self.loss_sum += torch.stack([loss.detach(), parts["position"].detach(), parts["grade"].detach()]) * n
        self.position_prob.append(outputs["position"].detach().float().softmax(dim=1))  # (B, P)
        self.grade_pred.append(outputs["grade"].detach().float())  # (B,)
        self.position_true.append(position)
        self.grade_true.append(grade)
        self.images += n

    def arrays(self) -> dict[str, Any]:
        """numpy arrays for compute_metrics and the mean losses. A device sync point (.cpu())."""
        if self.images == 0:
            raise CornpipeError("an epoch produced no batches (empty split or batch size > split size)")
        means = (self.loss_sum / self.images).cpu().tolist()
        return {
            "position_true": torch.cat(self.position_true).cpu().numpy(),
            "position_prob": torch.cat(self.position_prob).cpu().numpy(),
            "grade_true": torch.cat(self.grade_true).float().cpu().numpy(),
            "grade_pred": torch.cat(self.grade_pred).cpu().numpy(),
            "loss": means[0], "position_loss": means[1], "grade_loss": means[2],
        }


def summarize(out: dict[str, Any], cfg: TrainConfig, data: dict[str, Any], bootstrap: int) -> dict[str, Any]:
    """compute_metrics + losses + throughput: one "M" object of metrics.jsonl."""
    metrics = compute_metrics(out["position_true"], out["position_prob"], out["grade_true"], out["grade_pred"],
                              grade_scale=data["grade_scale"], positions=data["positions"],
                              tolerance=cfg.tolerance, bootstrap=bootstrap, seed=cfg.seed)
    return {**metrics, "loss": out["loss"], "position_loss": out["position_loss"],
            "grade_loss": out["grade_loss"], "images_per_s": out["images"] / out["seconds"],
            "data_wait_share": out["data_wait_s"] / out["seconds"]}


def prepare_run_dir(run: Path, force: bool, dry_run: bool = False) -> None:
    """A fresh run directory: refuse a used one unless --force, then clear only the files a run writes."""
    if run.exists() and any(run.iterdir()):
        if not force:
            raise ConfigError(f"run directory {run} already exists; use --force to overwrite it "
                              f"or --resume {run} to continue it")
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
                            stopper: EarlyStopping, console: Console, epochs_run: int) -> TrainResult:
    """Restore the best checkpoint, write the report and say what the best epoch reached."""
    best = load_checkpoint(run / BEST, map_location=cfg.device)
    model.load_state_dict(best["model"])
    if ema is not None:
        ema.load_state_dict(best["ema"])
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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)  # no decay on norms and biases
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


class NonFiniteStep(Exception):
    """The loss (or, without a GradScaler, the gradient) of a step was NaN/inf; no update was made."""


def optimizer_step(model: nn.Module, raw_model: nn.Module, images: torch.Tensor, position: torch.Tensor,
                   grade: torch.Tensor, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, dtype: torch.dtype | None,
                   grad_clip: float) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """One training step (autocast forward, float32 loss, scaled backward, clipping, optimiser step):
    the trainer's and `cornpipe bench train`'s. Returns (outputs, loss, loss parts)."""
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
    # Device sync point, once a step: no optimiser step may ever see a NaN/inf loss. With the fp16
    # GradScaler an inf gradient is expected now and then (the scaler skips that step and lowers
    # its scale), so only the loss is checked there; without a scaler the gradient is checked too.
    finite = torch.isfinite(loss)
    if grad_norm is not None and not scaler.is_enabled():
        finite = finite & torch.isfinite(grad_norm)
    if not bool(finite):
        raise NonFiniteStep
    scaler.step(optimizer)
    scaler.update()
    return outputs, loss, parts
