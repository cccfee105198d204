"""Validation: the evaluation loop, a checkpoint's metrics over a whole split, and the best epoch's
per-sample predictions (val_predictions.csv).

The trainer keeps the best epoch's validation predictions inside best.pt (`val_predictions`, tensors:
sample_id, position_true, position_prob, grade_true, grade_pred; gathered from every rank under DDP, in
row order), so they always belong to the weights best.pt holds, also across a resume; at the end of a run
rank 0 writes them to RUN/val_predictions.csv, one row per validated sample:

    sample_id, path, source, stage, split    the manifest's sample (split: the convert-time one)
    position_true, position_pred             class names; position_pred = argmax of the probabilities
    prob_<position> ...                      softmax probabilities, one column per class
    grade_true, grade_pred                   grade units; grade_pred is the head's output (MAE uses it)
    grade_pred_level                         grade_pred snapped to the nearest scale level (QWK uses it)

Floats are written as float32's shortest round-trip text, so metrics recomputed from the file agree
with the run's logged best-epoch metrics (argmax exactly; means to float32 rounding).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from cornpipe.loaders import make_loader
from cornpipe.loaders.base import IMAGENET, Normalization
from cornpipe.models import create_model
from cornpipe.models.losses import MultiTaskLoss
from cornpipe.models.metrics import snap_to_scale
from cornpipe.runs.checkpoint import BEST, inference_weights, load_checkpoint
from cornpipe.runs.config import TrainConfig, resolve_runtime
from cornpipe.runs.cv import fold_ids
from cornpipe.runs.epoch_metrics import Collector, summarize
from cornpipe.runs.run_dir import PREDICTIONS_FILE
from cornpipe.shards.shard_set import ShardSet

PREDICTION_KEYS = ("sample_id", "position_true", "position_prob", "grade_true", "grade_pred")
SAMPLE_COLUMNS = ("sample_id", "path", "source", "stage", "split")


def amp_dtype(cfg: TrainConfig) -> torch.dtype | None:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.amp)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Any, loss_fn: nn.Module, cfg: TrainConfig, *, steps: int,
             progress: Progress, task: Any) -> dict[str, Any]:
    """Predictions and losses over the validation loader (deterministic transform, no dropout)."""
    model.eval()
    device = torch.device(cfg.device)
    dtype = amp_dtype(cfg)
    collected = Collector(device)
    data_wait = 0.0
    start = time.perf_counter()
    batches = iter(loader)
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(batches, None)
        data_wait += time.perf_counter() - t0
        if batch is None:
            break
        images = batch.images  # (B, 3, H, W)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = model(images)
        outputs = {k: v.float() for k, v in outputs.items()}
        loss, parts = loss_fn(outputs, batch.position, batch.grade)
        collected.add(outputs, batch.position, batch.grade, batch.sample_id, loss, parts)
        progress.update(task, advance=1, ips=collected.images / (time.perf_counter() - start))
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync point: timing
    seconds = time.perf_counter() - start
    return {**collected.arrays(), "seconds": seconds, "images": collected.images, "data_wait_s": data_wait}


def evaluate_checkpoint(checkpoint: Path | str, shards: Path | str | None = None, split: str = "val", *,
                        device: str = "cpu", workers: int = 0) -> dict[str, Any]:
    """One process's validation metrics of a checkpoint over a whole split (the run's own shard set and
    val split by default), computed exactly as the trainer computes them (same transform, same bootstrap
    seed, predictions in row order): what a DDP run's gathered validation must equal."""
    state = load_checkpoint(Path(checkpoint))
    cfg = TrainConfig.from_dict(state["config"], source=str(checkpoint))
    cfg = resolve_runtime(dataclasses.replace(cfg, device=device, amp="off", compile=False, workers=workers,
                                              max_batches=0), torch.cuda.is_available())
    data = state["data"]
    saved = data.get("normalization")
    norm = Normalization(tuple(saved["mean"]), tuple(saved["std"])) if saved else IMAGENET
    model = create_model(cfg.model, num_positions=len(data["positions"]), grade_scale=data["grade_scale"],
                         grade_head=cfg.grade_head)
    model.load_state_dict(inference_weights(state))
    model = model.to(torch.device(cfg.device))
    loss_fn = MultiTaskLoss(weights=cfg.loss_weights, label_smoothing=cfg.label_smoothing,
                            grade_scale=data["grade_scale"], grade_head=cfg.grade_head)
    shard_set = ShardSet(shards or cfg.shards)
    fold = fold_ids(shard_set.manifest["samples"], cfg) if split == "val" else None  # the run's own val fold
    loader = make_loader(shard_set, split, backend=cfg.loader, batch_size=cfg.batch_size,
                         sample_ids=fold[1] if fold else None,
                         image_size=cfg.image_size, device=cfg.device, seed=cfg.seed, workers=cfg.workers,
                         channels_last=False, normalization=norm, oversample="none", shuffle=False,
                         augment=False, dtype=torch.float32)
    try:
        with Progress(disable=True) as progress:
            out = evaluate(model, loader, loss_fn, cfg, steps=len(loader), progress=progress,
                           task=progress.add_task("eval", total=len(loader), ips=0.0))
    finally:
        loader.close()
    return summarize(out, cfg, data, bootstrap=cfg.bootstrap)


# ---- the best epoch's predictions ---------------------------------------------------------------------

def prediction_tensors(out: dict[str, Any]) -> dict[str, torch.Tensor]:
    """evaluate()'s (gathered) predictions as the tensors best.pt keeps (torch.load(weights_only=True)-safe)."""
    return {key: torch.from_numpy(np.ascontiguousarray(out[key])) for key in PREDICTION_KEYS}


def prediction_columns(positions: Sequence[str]) -> list[str]:
    return [*SAMPLE_COLUMNS, "position_true", "position_pred", *(f"prob_{p}" for p in positions),
            "grade_true", "grade_pred", "grade_pred_level"]


def _text(values: np.ndarray) -> list[str]:
    return [str(v) for v in np.asarray(values, dtype=np.float32)]  # float32's shortest round-trip text


def write_predictions(run: Path, samples: Sequence[dict]) -> Path | None:
    """RUN/val_predictions.csv from RUN/best.pt's `val_predictions` (see the module docstring); atomic.
    `samples`: the shard set's manifest samples (for path, source, stage and split). None: best.pt was
    written before cornpipe kept predictions in it."""
    best = load_checkpoint(run / BEST)
    if "val_predictions" not in best:
        return None
    predictions, data = best["val_predictions"], best["data"]
    path = run / PREDICTIONS_FILE
    positions = [str(p) for p in data["positions"]]
    by_id = {int(s["id"]): s for s in samples}
    ids = predictions["sample_id"].tolist()
    prob = predictions["position_prob"].float().numpy()  # (N, P)
    true = predictions["position_true"].tolist()
    grade_pred = predictions["grade_pred"].float().numpy()
    grade_true, grade_pred_text = _text(predictions["grade_true"].numpy()), _text(grade_pred)
    levels = snap_to_scale(grade_pred, data["grade_scale"])
    prob_text = [_text(row) for row in prob]
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(prediction_columns(positions))
        for i, sample_id in enumerate(ids):
            sample = by_id.get(int(sample_id), {})
            writer.writerow([sample_id, *(sample.get(k, "") for k in SAMPLE_COLUMNS[1:]), positions[true[i]],
                             positions[int(prob[i].argmax())], *prob_text[i], grade_true[i], grade_pred_text[i],
                             f"{levels[i]:g}"])
    os.replace(tmp, path)
    return path
