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

The predicted columns are named once, here: `cornpipe predict` (and load_model's rows) and `cornpipe
evaluate`'s predictions.csv use them too (README, "Prediction files").

Floats are written as float32's shortest round-trip text, so metrics recomputed from the file agree
with the run's logged best-epoch metrics (argmax exactly; means to float32 rounding).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from cornpipe.loaders import make_loader
from cornpipe.models.metrics import snap_to_scale
from cornpipe.runs.build import Run, amp_dtype, run_from_checkpoint
from cornpipe.runs.checkpoint import BEST, load_checkpoint
from cornpipe.runs.config import TrainConfig
from cornpipe.runs.epoch_metrics import Collector, TimedBatches, summarize
from cornpipe.runs.run_dir import PREDICTIONS_FILE
from cornpipe.shards.shard_set import ShardSet

PREDICTION_KEYS = ("sample_id", "position_true", "position_prob", "grade_true", "grade_pred")
SAMPLE_COLUMNS = ("sample_id", "path", "source", "stage", "split")


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Any, loss_fn: nn.Module, cfg: TrainConfig, *, steps: int,
             progress: Progress, task: Any, tta: bool = False) -> dict[str, Any]:
    """Predictions and losses over the validation loader (deterministic transform, no dropout). `tta`: the
    softmax probabilities and grades averaged over each image and its horizontal mirror (as predict's)."""
    model.eval()
    device = torch.device(cfg.device)
    dtype = amp_dtype(cfg.amp)
    collected = Collector(device)
    timed = TimedBatches(loader, steps, device)
    for batch in timed:
        views = (batch.images, batch.images.flip(3)) if tta else (batch.images,)  # (B, 3, H, W)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = _mean_view(model, views)
        loss, parts = loss_fn(outputs, batch.position, batch.grade)
        collected.add(outputs, batch.position, batch.grade, batch.sample_id, loss, parts)
        progress.update(task, advance=1, ips=collected.images / timed.elapsed())
    return {**collected.arrays(), **timed.finish(), "images": collected.images}


def _mean_view(model: nn.Module, views: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's outputs on one view, or on several averaged: mean softmax as log-probabilities (so the
    Collector's softmax gives the mean back) and mean grade. A calibration temperature then divides these
    log-probabilities (predict divides each view's logits): the argmax, and so every class metric, is the same."""
    if len(views) == 1:
        return {k: v.float() for k, v in model(views[0]).items()}
    outs = [model(view) for view in views]
    prob = torch.stack([o["position"].float().softmax(dim=1) for o in outs]).mean(0)
    log_prob = prob.clamp_min(torch.finfo(prob.dtype).tiny).log()  # a softmax underflowed to 0: finite loss
    return {"position": log_prob, "grade": torch.stack([o["grade"].float() for o in outs]).mean(0)}


def evaluate_checkpoint(checkpoint: Path | str, shards: Path | str | None = None, split: str = "val", *,
                        device: str = "cpu", workers: int = 0) -> dict[str, Any]:
    """One process's validation metrics of a checkpoint over a whole split (the run's own shard set and
    val split by default), computed exactly as the trainer computes them (same transform, same bootstrap
    seed, predictions in row order): what a DDP run's gathered validation must equal."""
    state = load_checkpoint(Path(checkpoint))
    saved = TrainConfig.from_dict(state["config"], source=str(checkpoint))
    shard_set = ShardSet(shards or saved.shards)
    run = run_from_checkpoint(state, str(checkpoint), device=device, amp="off", compile=False, channels_last=False,
                              workers=workers, max_batches=0,
                              samples=shard_set.manifest["samples"] if split == "val" else None)  # its val fold
    request = run.val_request() if split == "val" else dict(run.loader_fields(), oversample="none", shuffle=False)
    out = evaluate_split(run, shard_set, split, request)
    return summarize(out, run.cfg, state["data"], bootstrap=run.cfg.bootstrap)


def evaluate_split(run: Run, shard_set: ShardSet, split: str, request: dict[str, Any], *,
                   tta: bool = False) -> dict[str, Any]:
    """The run's model over `split` of `shard_set`, read as `request` says (make_loader's keywords) without
    augmentation: the raw outputs `summarize` takes (evaluate_checkpoint and `cornpipe evaluate` share it).
    `tta`: averaged with each image's mirror (evaluate)."""
    loader = make_loader(shard_set, split, augment=False, **request)
    try:
        with Progress(disable=True) as progress:
            return evaluate(run.model, loader, run.loss_fn, run.cfg, steps=len(loader), progress=progress,
                            task=progress.add_task("eval", total=len(loader), ips=0.0), tta=tta)
    finally:
        loader.close()


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
    predictions = {k: v.numpy() for k, v in best["val_predictions"].items()}
    return write_prediction_rows(run / PREDICTIONS_FILE, predictions, best["data"], samples)


def write_prediction_rows(path: Path, predictions: dict[str, Any], data: dict[str, Any],
                          samples: Sequence[dict]) -> Path:
    """`path` (atomic): one prediction_columns() row per sample of `predictions` (PREDICTION_KEYS' arrays, in
    row order); `data`: the checkpoint's (positions, grade scale). val_predictions.csv and `cornpipe
    evaluate`'s predictions.csv are both written here."""
    positions = [str(p) for p in data["positions"]]
    by_id = {int(s["id"]): s for s in samples}
    ids = np.asarray(predictions["sample_id"]).tolist()
    prob = np.asarray(predictions["position_prob"], dtype=np.float32)  # (N, P)
    true = np.asarray(predictions["position_true"]).tolist()
    grade_pred = np.asarray(predictions["grade_pred"], dtype=np.float32)
    grade_true, grade_pred_text = _text(np.asarray(predictions["grade_true"])), _text(grade_pred)
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
