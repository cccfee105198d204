"""`cornpipe evaluate MODEL SHARDS --out DIR`: a trained model's validation metrics on a labelled shard set.

The click edge over cornpipe.runs.model_eval. Its run options (--batch-size, --loader, --device, ...) are
copies of `cornpipe train`'s, saying what evaluate defaults to: the run's own setting, or this machine's.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import click

from cornpipe.cli.handler import CornpipeCommand
from cornpipe.cli.runs import train_command

# train's option -> evaluate's default (None: the value the run was trained with)
SHARED_OPTIONS = {"batch_size": None, "loader": None, "workers": None, "device": "auto", "amp": "auto",
                  "bootstrap": None, "tolerance": None, "threads": None}


def _run_option(name: str, default: str | None) -> click.Parameter:
    """`cornpipe train`'s option `name` (same flag, type and words) with the default evaluate applies."""
    option = copy.copy(next(p for p in train_command.params if p.name == name))
    words = (option.help or "").split(" [default:")[0].split(" PER PROCESS")[0].strip().rstrip(".")
    option.help = f"{words}.  [default: {default or 'as the run was trained'}]"
    return option


@click.command("evaluate", cls=CornpipeCommand)
@click.argument("model", type=click.Path(exists=True))
@click.argument("shards", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Folder to write metrics.json, predictions.csv, report.md and confusion_matrix.png into.")
@click.option("--split", type=click.Choice(["train", "val"]), default=None,
              help="Evaluate one convert-time split (a CV run's own shard set: its val fold) [default: every "
                   "sample].")
@click.option("--raw-probs", "raw_probs", is_flag=True,
              help="Uncalibrated softmax probabilities (default: divided by the run's fitted temperature).")
@click.option("--tta", is_flag=True, help="Test-time augmentation: average each image's probabilities and grade "
              "with its horizontal mirror's (as `predict --tta`).")
def evaluate_command(model: str, shards: str, out: str, split: str | None, raw_probs: bool, tta: bool,
                     **flags: Any) -> None:
    """Evaluate MODEL (a run folder, which uses RUN/best.pt, or a checkpoint) on SHARDS (a `cornpipe convert`
    output): the metrics, 95 % intervals, confusion matrix and per-sample predictions a run's validation
    writes, computed by the same code."""
    from cornpipe.runs.model_eval import EVAL_METRICS_FILE, evaluate_model

    overrides = {k: v for k, v in flags.items() if v is not None}
    record = evaluate_model(Path(model), Path(shards), Path(out), split=split, raw=raw_probs, tta=tta,
                            **overrides)
    m = record["metrics"]
    click.echo(f"{m['n_samples']} images: position accuracy {m['position_accuracy']:.4f}, macro-F1 "
               f"{m['position_macro_f1']:.4f}, grade MAE {m['grade_mae']:.4f} -> {Path(out) / EVAL_METRICS_FILE}")


evaluate_command.params += [_run_option(name, default) for name, default in SHARED_OPTIONS.items()]
