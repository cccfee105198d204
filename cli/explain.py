"""`cornpipe explain MODEL IMAGES... --out DIR`: the class-activation map behind each position call, one PNG per image.

The click edge over cornpipe.runs.explain (imported when the command runs: no torch at CLI start).
"""

from __future__ import annotations

from pathlib import Path

import click

from cornpipe.cli.handler import CornpipeCommand


@click.command("explain", cls=CornpipeCommand)
@click.argument("model", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out", required=True, type=click.Path(), help="Folder to write one <image>.cam.png into per image.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CSV with columns path,position: the true positions to map too (images in the model's shard set "
                   "are known without it).")
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda or cuda:N.")
def explain_command(model: str, inputs: tuple[str, ...], out: str, labels: str | None, device: str) -> None:
    """Draw, for each of IMAGES (files or folders), the photo as MODEL (a run folder, which uses RUN/best.pt,
    or a checkpoint) sees it with the Grad-CAM of its predicted position over it, and of the true position when
    known: what part of the photo the call rests on. Needs the `explain` extra (grad-cam)."""
    from cornpipe.predict import image_files
    from cornpipe.runs.explain import explain

    summary = explain(Path(model), image_files([Path(p) for p in inputs]), Path(out),
                      labels=Path(labels) if labels else None, device=device)
    for path, why in summary.failed:
        click.echo(f"unreadable: {path}: {why}", err=True)
    click.echo(f"explained {len(summary.written)} image(s), {len(summary.failed)} unreadable -> {out}")
    if not summary.written:
        raise click.ClickException(f"no image could be read ({len(summary.failed)} failed)")
