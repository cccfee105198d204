"""`cornpipe synth OUT`: write the built-in synthetic dataset (a thin edge over `make_synthetic`)."""

from __future__ import annotations

import click

from loaders.base import CornpipeError
from loaders.fields import DEFAULT_GRADE_SCALE
from loaders.synth import (
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    make_synthetic,
    parse_grade_scale,
    parse_position_weights,
)


def grade_scale_option(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    """click callback: `0,3,5,7,9` or `0-25` -> tuple of grades; bad text -> usage error (exit 2)."""
    if value is None:
        return None
    try:
        return parse_grade_scale(value)
    except CornpipeError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def _position_weights_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        return parse_position_weights(value)
    except CornpipeError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@click.command()
@click.argument("out", type=click.Path(file_okay=False, writable=True))
@click.option("--per-source", type=click.IntRange(min=1), default=40, show_default=True,
              help="Images per source folder (the mean per source when --position-weights is given).")
@click.option("--image-size", type=click.IntRange(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE), default=512,
              show_default=True, help="Side of the square JPEG images, in pixels.")
@click.option("--grade-scale", default=",".join(map(str, DEFAULT_GRADE_SCALE)), show_default=True,
              callback=grade_scale_option, help="Allowed grades, ascending: a list 0,3,5,7,9 or a range 0-25.")
@click.option("--position-weights", default=None, callback=_position_weights_option,
              help="Share of lower,middle,upper images, e.g. 0.6,0.3,0.1 (default: balanced).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
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
    try:
        summary = make_synthetic(out, per_source=per_source, image_size=image_size, grade_scale=grade_scale,
                                 position_weights=position_weights, seed=seed, force=force, workers=workers)
    except CornpipeError as exc:
        raise click.ClickException(str(exc)) from None
    positions = ", ".join(f"{name} {n}" for name, n in summary["positions"].items())
    click.echo(
        f"wrote {summary['images']} images in {len(summary['sources'])} sources ({positions}) to {out}: "
        f"{summary['bytes'] / 1e6:.2f} MB in {summary['seconds']:.1f} s"
    )
