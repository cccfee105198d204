"""`cornpipe export MODEL --out DIR`: the click edge over cornpipe.runs.export (torch loads inside the command)."""

from __future__ import annotations

from pathlib import Path

import click

from cornpipe.cli.handler import CornpipeCommand

FORMATS = "onnx,torchscript,safetensors"  # cornpipe.runs.export.FORMATS, named here without importing torch


@click.command("export", cls=CornpipeCommand)
@click.argument("model", type=click.Path(exists=True))
@click.option("--out", "out", required=True, type=click.Path(), help="Folder to write the model files and "
              "model_card.json into.")
@click.option("--format", "formats", default=FORMATS, show_default=True,
              help="Comma-separated: onnx (needs the `export` extra), torchscript, safetensors.")
@click.option("--force", is_flag=True, help="Overwrite model files and model_card.json already in --out.")
def export_command(model: str, out: str, formats: str, force: bool) -> None:
    """Export MODEL (a run folder, for its best.pt, or a checkpoint) for deployment: the inference model
    (EMA weights when kept; outputs position_probs (B, P) and grade (B,)) and DIR/model_card.json with
    its classes, grade scale, preprocessing, validation metrics and sha256 of every file."""
    from cornpipe.runs.export import export_model

    summary = export_model(Path(model), Path(out), formats, force=force)
    names = ", ".join(p.name for p in summary.files.values())
    click.echo(f"exported {names} and {summary.card.name} -> {summary.out}")
