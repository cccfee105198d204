"""`cornpipe evaluate MODEL SHARDS --out DIR`: a trained model's validation metrics on a labelled shard set.

The click edge over cornpipe.runs.model_eval. Its run options (--batch-size, --loader, --device, ...) are
`cornpipe train`'s own option objects, so their help and defaults are written once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cornpipe.cli.handler import CornpipeCommand
from cornpipe.cli.runs import train_command

SHARED_OPTIONS = ("batch_size", "loader", "workers", "device", "amp", "bootstrap", "tolerance")


@click.command("evaluate", cls=CornpipeCommand)
@click.argument("model", type=click.Path(exists=True))
@click.argument("shards", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Folder to write metrics.json, predictions.csv, report.md and confusion_matrix.png into.")
@click.option("--split", type=click.Choice(["train", "val"]), default=None,
              help="Evaluate one convert-time split (a CV run's own shard set: its val fold) [default: every "
                   "sample].")
def evaluate_command(model: str, shards: str, out: str, split: str | None, **flags: Any) -> None:
    """Evaluate MODEL (a run folder, which uses RUN/best.pt, or a checkpoint) on SHARDS (a `cornpipe convert`
    output): the metrics, 95 % intervals, confusion matrix and per-sample predictions a run's validation
    writes, computed by the same code."""
    from cornpipe.runs.model_eval import EVAL_METRICS_FILE, evaluate_model

    overrides = {k: v for k, v in flags.items() if v is not None}
    record = evaluate_model(Path(model), Path(shards), Path(out), split=split, **overrides)
    m = record["metrics"]
    click.echo(f"{m['n_samples']} images: position accuracy {m['position_accuracy']:.4f}, macro-F1 "
               f"{m['position_macro_f1']:.4f}, grade MAE {m['grade_mae']:.4f} -> {Path(out) / EVAL_METRICS_FILE}")


evaluate_command.params += [p for p in train_command.params if p.name in SHARED_OPTIONS]
