"""Shard-set commands: `synth` (built-in dataset), `convert`, `inspect`, `verify`.

Thin edges over cornpipe.shards (synth, convert, inspect): parse options, call the function, print
what it did. A CornpipeError is worded once, by the command class each command uses
(cornpipe.cli.handler.CornpipeCommand).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from cornpipe.cli.handler import SEED, CornpipeCommand
from cornpipe.errors import CornpipeError
from cornpipe.shards.fields import DEFAULT_GRADE_SCALE, DEFAULT_MAX_PIXELS, WRITE_MODES
from cornpipe.shards.synth import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, parse_grade_scale, parse_position_weights

__all__ = ["convert", "inspect_command", "synth", "verify"]


def parsed_option(parse: Callable[[str], Any]) -> Callable[[click.Context, click.Parameter, str | None], Any]:
    """A click callback: `parse(text)`, its CornpipeError a usage error (exit 2) naming the option."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except CornpipeError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback


def _echo_err(line: str) -> None:
    click.echo(line, err=True)


grade_scale_option = parsed_option(parse_grade_scale)  # `0,3,5,7,9` or `0-25` -> tuple of grades
_position_weights_option = parsed_option(parse_position_weights)  # `0.6,0.3,0.1` -> shares


@click.command(cls=CornpipeCommand)
@click.argument("out", type=click.Path(file_okay=False, writable=True))
@click.option("--per-source", type=click.IntRange(min=1), default=40, show_default=True,
              help="Images per source folder (the mean per source when --position-weights is given).")
@click.option("--image-size", type=click.IntRange(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), default=512,
              show_default=True, help="Side of the square JPEG images, in pixels.")
@click.option("--grade-scale", default=",".join(map(str, DEFAULT_GRADE_SCALE)), show_default=True,
              callback=grade_scale_option, help="Allowed grades, ascending: a list 0,3,5,7,9 or a range 0-25.")
@click.option("--position-weights", default=None, callback=_position_weights_option,
              help="Share of lower,middle,upper images, e.g. 0.6,0.3,0.1 (default: balanced).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Same seed, same bytes.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes drawing images [default: all cores]; the output does not depend on it.")
@click.option("--force", is_flag=True, help="Replace OUT when it exists and is not empty.")
def synth(out: str, per_source: int, image_size: int, grade_scale: tuple[int, ...],
          position_weights: tuple[float, float, float] | None, seed: int, workers: int | None,
          force: bool) -> None:
    """Write a synthetic maize-leaf collection to OUT: 9 source folders (9l ... 19t) with labels.csv.

    Leaf colour and width show the leaf position; lesion count and area grow with the grade.
    """
    from cornpipe.shards.synth import make_synthetic

    summary = make_synthetic(out, per_source=per_source, image_size=image_size, grade_scale=grade_scale,
                             position_weights=position_weights, seed=seed, force=force, workers=workers)
    positions = ", ".join(f"{name} {n}" for name, n in summary["positions"].items())
    click.echo(
        f"wrote {summary['images']} images in {len(summary['sources'])} sources ({positions}) to {out}: "
        f"{summary['bytes'] / 1e6:.2f} MB in {summary['seconds']:.1f} s"
    )


@click.command(cls=CornpipeCommand, short_help="Convert raw images + labels once into FFCV and webdataset/DALI shards.")
@click.argument("paths", nargs=-1, metavar="[SRC] OUT", type=click.Path(path_type=Path))
@click.option("--manifest", "manifest_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with columns path,position,grade[,source,stage] (paths relative to the CSV), "
                   "instead of SRC.")
@click.option("--grade-scale", callback=grade_scale_option, metavar="SCALE",
              help="Allowed grades, e.g. 0,3,5,7,9 (default) or 0-25; every label is checked against it.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Share of images in the validation split (stratified by position x grade).")
@click.option("--max-resolution", type=int, default=512, show_default=True,
              help="Longest image side in px after resizing (LANCZOS; never upscaled).")
@click.option("--write-mode", type=click.Choice(WRITE_MODES), default="jpg", show_default=True,
              help="How the .beton stores pixels: JPEG, raw, or smart (raw for small images).")
@click.option("--jpeg-quality", type=int, default=90, show_default=True)
@click.option("--workers", type=int, default=None, help="Processes for decoding/writing [default: all cores].")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the train/val split.")
@click.option("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Decompression-bomb limit: larger inputs are rejected.")
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Samples per tar shard.")
@click.option("--formats", default="beton,wds", show_default=True, metavar="LIST",
              help="What to write: beton,wds (both) or wds (tar shards + DALI index only: no FFCV needed; "
                   "enough for the torch, resident and dali backends, not ffcv). The tar shards are always "
                   "written: every backend but ffcv, inspect and verify read them.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def convert(paths: tuple[Path, ...], manifest_csv: Path | None, grade_scale: Sequence[float] | None,
            val_fraction: float, max_resolution: int, write_mode: str, jpeg_quality: int,
            workers: int | None, seed: int, max_pixels: int, shard_size: int, formats: str,
            force: bool) -> None:
    """Convert SRC (folders 9l 9m ... 19t with labels.csv or grade sub-folders), or --manifest CSV,
    into OUT: train/val .beton (unless --formats wds), webdataset tar shards with DALI index files,
    manifest.json and rejected.csv. Every input is either converted or listed in rejected.csv with its
    reason."""
    from cornpipe.cli.progress import ProgressLines, convert_reporter
    from cornpipe.shards.convert import convert_dataset

    if manifest_csv is not None:
        if len(paths) != 1:
            raise click.UsageError("with --manifest give only OUT (the images are found from the CSV)")
        src, out = None, paths[0]
    else:
        if len(paths) != 2:
            raise click.UsageError("give SRC and OUT (or --manifest CSV and OUT)")
        src, out = paths
        if not src.is_dir():
            raise click.ClickException(f"{src} is not a folder")
    if workers is not None and workers < 1:
        raise click.BadParameter("must be at least 1", param_hint="--workers")
    tty = sys.stderr.isatty()  # a terminal gets rich's bar, a log plain lines
    on_progress = None if tty else convert_reporter(ProgressLines("convert", "images", "img", _echo_err))
    summary = convert_dataset(
        src, out, manifest_csv=manifest_csv, grade_scale=grade_scale, val_fraction=val_fraction,
        max_resolution=max_resolution, write_mode=write_mode, jpeg_quality=jpeg_quality,
        workers=workers, seed=seed, force=force, shard_size=shard_size, max_pixels=max_pixels,
        formats=formats, progress=tty, on_progress=on_progress,
    )
    for name in summary.cleaned:
        click.echo(f"removed {name}, left by an interrupted convert")
    counts = ", ".join(f"{k} {v}" for k, v in summary.split_counts.items())
    click.echo(f"wrote {summary.out} ({counts})")
    if summary.rejected:
        reasons = "; ".join(f"{n}x {r}" for r, n in sorted(summary.reasons.items(), key=lambda kv: -kv[1]))
        click.echo(f"rejected: {reasons} (see {summary.out / 'rejected.csv'})")
    click.echo(summary.line())


@click.command("inspect", cls=CornpipeCommand, short_help="Show what a shard set holds.")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect_command(out: Path, as_json: bool) -> None:
    """Counts per split x source x position x grade, image sizes and bytes on disk of OUT."""
    from cornpipe.shards.inspect import dumps, inspect_shards, render_inspect

    info = inspect_shards(out)
    if as_json:
        click.echo(dumps(info))
        return
    from rich.console import Console

    render_inspect(info, Console(markup=False, width=None if sys.stdout.isatty() else 120))


@click.command(cls=CornpipeCommand, short_help="Check every file and image of a shard set.")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(out: Path) -> None:
    """Re-hash every file of OUT against its manifest and decode every image from the .beton files (when
    written) and the tar shards. Exit 0 only when all is intact; otherwise name the damaged file."""
    from cornpipe.shards.inspect import verify_shards

    report = verify_shards(out)
    if "beton" in report["formats"]:
        decoded = f"{report['beton_images']} images from .beton and {report['tar_images']} from tar shards"
    else:
        decoded = f"{report['tar_images']} images from tar shards (no .beton: converted with --formats wds)"
    click.echo(f"ok: {report['files']} files match their sha256; decoded {decoded} in {report['seconds']:.1f} s")
