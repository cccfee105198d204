"""The one place a library error becomes `Error: <cause>`: the command classes every cornpipe command uses.

Library code raises `cornpipe.errors.CornpipeError` with a one-line message; these classes turn it into
click's `Error: <cause>` with exit code 1, for every command and sub-command, whether it runs under the
`cornpipe` group (`cornpipe`, `python -m cornpipe`) or alone (a command's own `main()`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

import click

from cornpipe.choices import SEED_MAX
from cornpipe.errors import CornpipeError

SEED = click.IntRange(0, SEED_MAX)  # every --seed: out of range is one usage `Error:` line, not numpy's traceback


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line (a path or decoder message may carry newlines)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class CornpipeCommand(click.Command):
    """A click command whose CornpipeErrors print as `Error: <cause>` (exit 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CornpipeError as exc:
            raise click.ClickException(one_line(exc)) from None


class CornpipeGroup(click.Group):
    """A click group whose commands (made with `@group.command()` or `cls=CornpipeCommand`) word
    CornpipeErrors the same way."""

    command_class = CornpipeCommand

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CornpipeError as exc:
            raise click.ClickException(one_line(exc)) from None


CornpipeGroup.group_class = CornpipeGroup
