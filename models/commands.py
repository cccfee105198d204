"""`cornpipe report RUN` and `cornpipe predict CKPT IMAGES...`: the click edge over models.report and
models.predict (training itself is `train.py`)."""

from __future__ import annotations

from pathlib import Path

import click

from loaders.base import CornpipeError
from models.report import write_report


@click.command("report")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
def report_command(run: str) -> None:
    """Rebuild RUN/report.md, curves.png and confusion_matrix.png from RUN/metrics.jsonl."""
    try:
        write_report(Path(run))
    except CornpipeError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {Path(run) / 'report.md'}, curves.png, confusion_matrix.png")


@click.command("predict")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="CSV to write.")
@click.option("--tta/--no-tta", default=False, show_default=True,
              help="Average with the horizontally flipped image.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
def predict_command(checkpoint: str, inputs: tuple[str, ...], out: str, tta: bool, device: str,
                    batch_size: int) -> None:
    """Predict position and grade for IMAGES (files or folders) with a checkpoint; writes a CSV."""
    from models.predict import predict

    try:
        summary = predict(Path(checkpoint), [Path(p) for p in inputs], Path(out), tta=tta, device=device,
                          batch_size=batch_size)
    except CornpipeError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"predicted {summary.predicted} image(s), {summary.failed} unreadable -> {out}")
    if summary.predicted == 0:
        raise click.ClickException(f"no image could be read ({summary.failed} failed; see {out})")
