"""`cornpipe audit CVDIR --out DIR`: the click edge over cornpipe.runs.audit (cleanlab loads inside the command)."""

from __future__ import annotations

from pathlib import Path

import click

from cornpipe.cli.handler import CornpipeCommand


@click.command("audit", cls=CornpipeCommand)
@click.argument("folder", metavar="CVDIR", type=click.Path(exists=True))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Folder to write label_issues.csv and suspects.png into.")
@click.option("--top", type=click.IntRange(1, 200), default=24, show_default=True,
              help="Suspects drawn on the contact sheet.")
def audit_command(folder: str, out: str, top: int) -> None:
    """Rank the samples whose given position label the held-out predictions most doubt (confident
    learning, cleanlab; needs the `audit` extra). CVDIR is a `cornpipe cv` folder (its out-of-fold
    predictions, seeds averaged) or a run folder (its validation predictions only: part of the data).
    Writes DIR/label_issues.csv (path, source, given, suggested, score; most suspect first) and
    DIR/suspects.png (the top suspects' thumbnails)."""
    from cornpipe.runs.audit import audit

    result = audit(Path(folder), Path(out), top=top)
    pred = result.predictions
    seeds = f", {len(pred.seeds)} seeds averaged" if len(pred.seeds) > 1 else ""
    for note in result.notes:
        click.echo(f"note: {note}")
    sheet = f", {result.sheet_path}" if result.sheet_path else ""
    click.echo(f"{len(result.issues)} of {len(pred.sample_ids)} samples flagged as label issues{seeds} -> "
               f"{result.csv_path}{sheet}")
