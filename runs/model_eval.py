"""`cornpipe evaluate`: a trained model's metrics on a labelled shard set (next season's photos, another
field), written as a run's validation writes them.

    DIR/metrics.json          compute_metrics' numbers (intervals, confusion, recall) + losses, what was evaluated
    DIR/predictions.csv       one row per sample, the columns of val_predictions.csv (runs.evaluation)
    DIR/report.md             the metrics table and the confusion matrix
    DIR/confusion_matrix.png

The loop, the transform, the metrics and the bootstrap seed are the trainer's own (runs.evaluation.evaluate,
runs.epoch_metrics.summarize): on a run's own val split the numbers are its logged validation metrics.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cornpipe.errors import ConfigError, OutputError
from cornpipe.runs.build import model_checkpoint, run_from_checkpoint
from cornpipe.runs.calibration import apply_temperature, ece, temperature_of
from cornpipe.runs.checkpoint import load_checkpoint
from cornpipe.runs.epoch_metrics import summarize
from cornpipe.runs.evaluation import evaluate_split, prediction_tensors, write_prediction_rows
from cornpipe.runs.report import CONFUSION_FILE, REPORT_FILE, TABLE_METRICS, format_ci, format_value
from cornpipe.shards.shard_set import ShardSet

EVAL_METRICS_FILE = "metrics.json"
EVAL_PREDICTIONS_FILE = "predictions.csv"


def _check_out(out: Path, inputs: Sequence[Path], shards: Path) -> None:
    """Refuse an --out that is one of the inputs (a run folder already holds a report.md) or inside the
    shard set (its files are hashed by the manifest); a folder inside the run folder is fine."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder to write")
    target = out.resolve()
    for item in [*inputs, shards]:
        if target == item.resolve() or (item == shards and shards.resolve() in target.parents):
            raise OutputError(f"--out {out} is an input ({item}); give a new folder")


def check_compatible(data: dict[str, Any], shard_set: ShardSet, source: str) -> None:
    """The model's position classes and grade scale must be the shard set's: its labels index the classes."""
    positions, scale = [str(p) for p in data["positions"]], [float(g) for g in data["grade_scale"]]
    if shard_set.positions != positions:
        raise ConfigError(f"{shard_set.root} has position classes {','.join(shard_set.positions)}, the model "
                          f"{source} predicts {','.join(positions)}")
    if shard_set.grade_scale != scale:
        raise ConfigError(f"{shard_set.root} has grade scale {','.join(f'{g:g}' for g in shard_set.grade_scale)}, "
                          f"the model {source} was trained on {','.join(f'{g:g}' for g in scale)}")


def evaluate_model(model: Path, shards: Path, out: Path, *, split: str | None = None, raw: bool = False,
                   tta: bool = False, **overrides: Any) -> dict[str, Any]:
    """Evaluate MODEL (a run folder or a checkpoint) on every sample of `shards` (or one `split`) into the
    folder `out`; returns what metrics.json holds. `overrides`: TrainConfig fields (batch_size, loader,
    workers, bootstrap, tolerance; device and amp: this machine's "auto" unless given); the rest is the run's.
    `split` "val" on the run's own shard set is a CV run's val fold, as its validation was. The probabilities
    are divided by the run's calibration temperature (runs.calibration) unless `raw`; `tta`: each image's
    probabilities and grade averaged with its horizontal mirror's."""
    checkpoint = model_checkpoint(model)
    _check_out(out, [model, checkpoint], shards)
    state = load_checkpoint(checkpoint)
    shard_set = ShardSet(shards)
    check_compatible(state["data"], shard_set, str(model))
    samples = shard_set.manifest["samples"]
    own = Path(state["config"].get("shards") or "").resolve() == shards.resolve()
    run = run_from_checkpoint(state, str(checkpoint), compile=False, max_batches=0,
                              **{"device": "auto", "amp": "auto", "channels_last": None, **overrides},
                              samples=samples if own and split == "val" else None)  # a CV run's own val fold
    if split is None:  # every sample, whichever split convert put it in
        request = dict(run.loader_fields(), oversample="none", shuffle=False,
                       sample_ids=sorted(int(s["id"]) for s in samples))
    elif split == "val":
        request = run.val_request()
    else:
        request = dict(run.loader_fields(), oversample="none", shuffle=False)
    result = evaluate_split(run, shard_set, split or "val", request, tta=tta)
    temperature = 1.0 if raw else temperature_of(state["data"])
    raw_prob = result["position_prob"]
    result["position_prob"] = apply_temperature(raw_prob, temperature)
    metrics = summarize(result, run.cfg, state["data"], bootstrap=run.cfg.bootstrap)
    labels = result["position_true"]
    calibration = {"temperature": temperature, "applied": temperature != 1.0, "raw_probs": raw,
                   "ece_raw": ece(raw_prob, labels) if len(labels) else None,
                   "ece": ece(result["position_prob"], labels) if len(labels) else None}
    record = {"model": str(checkpoint), "shards": str(shards), "split": split or "all",
              "fold": run.fold.name if run.fold else None, "tta": tta, "bootstrap": run.cfg.bootstrap,
              "tolerance": run.cfg.tolerance, "metrics": metrics, "calibration": calibration}
    out.mkdir(parents=True, exist_ok=True)
    predictions = {k: v.numpy() for k, v in prediction_tensors(result).items()}
    write_prediction_rows(out / EVAL_PREDICTIONS_FILE, predictions, state["data"], samples)
    _write_json(out / EVAL_METRICS_FILE, record)
    write_eval_report(out, record, [str(p) for p in state["data"]["positions"]])
    return record


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=float) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def calibration_lines(calibration: dict[str, Any] | None) -> list[str]:
    """One paragraph: which probabilities predictions.csv holds and their ECE here, raw and calibrated."""
    if not calibration:
        return []
    t = calibration["temperature"]
    which = ("raw softmax (--raw-probs)" if calibration["raw_probs"] else
             f"calibrated with the run's temperature T = {t:.3g}" if calibration["applied"] else
             "raw softmax (the run has no fitted temperature: T = 1)")
    ece_text = "" if calibration["ece_raw"] is None else (
        f" ECE (15 bins) on these images: raw {calibration['ece_raw']:.4f}"
        + (f", calibrated {calibration['ece']:.4f}." if calibration["applied"] else "."))
    return ["", f"Probabilities: {which}.{ece_text}"]


def write_eval_report(out: Path, record: dict[str, Any], positions: list[str]) -> Path:
    """DIR/report.md and DIR/confusion_matrix.png from metrics.json's record."""
    from cornpipe.runs.plots import plot_confusion

    metrics = record["metrics"]
    ci = metrics.get("ci") or {}
    lines = [f"# Evaluation: {record['model']}", "",
             f"Shards `{record['shards']}`, split `{record['split']}`"
             + (f" (fold {record['fold']})" if record["fold"] else "") + f", {metrics.get('n_samples')} images, "
             f"grade tolerance ±{record['tolerance']}, bootstrap {record['bootstrap']}"
             + (", each image averaged with its horizontal mirror (TTA)" if record.get("tta") else "") + ".", "",
             "| metric | value | 95% CI |", "|---|---|---|"]
    lines += [f"| {label} | {format_value(key, metrics[key])} | {format_ci(ci.get(key))} |"
              for key, label, _ in TABLE_METRICS if metrics.get(key) is not None]
    lines += calibration_lines(record.get("calibration"))
    never = metrics.get("never_predicted") or []
    if never:
        lines += ["", f"**WARNING: position class(es) {', '.join(never)} never predicted.**"]
    confusion = metrics.get("confusion")
    if confusion:
        lines += ["", "## Position confusion matrix", "", "| true \\ predicted | " + " | ".join(positions)
                  + " | total |", "|" + "---|" * (len(positions) + 2)]
        lines += [f"| **{positions[i]}** | " + " | ".join(str(c) for c in row) + f" | {sum(row)} |"
                  for i, row in enumerate(confusion)]
        plot_confusion(confusion, positions, out / CONFUSION_FILE, f"Position confusion, {record['split']}")
        lines += ["", f"![position confusion matrix]({CONFUSION_FILE})"]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
