"""`cornpipe` command line: the Face, and the only part of cornpipe that imports click.

Commands parse options, build a config and call an importable function. A library error
(`cornpipe.errors.CornpipeError`) becomes a one-line `Error: <cause>` and exit code 1 in exactly one
place, `cornpipe.cli.handler`, for every command and sub-command; anything else is a bug and keeps
its traceback.

    cli/data.py     synth, convert, inspect, verify       (over cornpipe.shards)
    cli/runs.py     train, report, predict, models         (over cornpipe.train, .runs, .predict, .models)
    cli/evaluate.py evaluate                               (over cornpipe.runs.model_eval)
    cli/export.py   export                                 (over cornpipe.runs.export)
    cli/audit.py    audit                                  (over cornpipe.runs.audit)
    cli/explain.py  explain                                (over cornpipe.runs.explain)
    cli/sweep.py    sweep                                  (over cornpipe.runs.sweep)
    cli/bench.py    bench loaders, bench train             (over cornpipe.bench; nothing else imports it)
    cli/handler.py  the command classes: CornpipeError -> `Error: <cause>`
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click


def _refuse_a_deleted_cwd() -> None:
    """A working folder deleted under the shell: numpy's MKL aborts at import with `Intel oneMKL FATAL
    ERROR` (exit 2), and every relative path would point nowhere. One line instead, before that import."""
    try:
        os.getcwd()
    except FileNotFoundError:
        sys.stderr.write("Error: the current folder no longer exists (deleted?); cd to a folder that exists "
                         "and run again\n")
        raise SystemExit(1) from None


_refuse_a_deleted_cwd()

from cornpipe.cli.handler import CornpipeGroup, one_line  # noqa: E402  (after the check, as every import)


@click.group(cls=CornpipeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cornpipe")
def cli() -> None:
    """cornpipe: convert maize-disease surveys once, feed them fast, train a two-task model."""


def _register() -> None:
    from cornpipe.cli.audit import audit_command
    from cornpipe.cli.bench import bench
    from cornpipe.cli.data import convert, inspect_command, synth, verify
    from cornpipe.cli.evaluate import evaluate_command
    from cornpipe.cli.explain import explain_command
    from cornpipe.cli.export import export_command
    from cornpipe.cli.runs import cv_command, models_command, predict_command, report_command, train_command
    from cornpipe.cli.sweep import sweep_command

    for command in (synth, convert, inspect_command, verify, train_command, cv_command, sweep_command,
                    report_command, predict_command, evaluate_command, explain_command, export_command,
                    audit_command, models_command, bench):
        cli.add_command(command)


_register()


def main(args: Sequence[str] | None = None, prog_name: str = "cornpipe") -> None:
    """The `cornpipe` console script (and `python -m cornpipe`; `python -m cornpipe.train` hands over to it)."""
    if sys.stdout is None:  # `>&-`: refused, since a file opened later could take fd 1 and get the output
        click.echo("Error: standard output is closed; send it somewhere (> /dev/null to discard it)", err=True)
        raise SystemExit(1)
    cli.main(args=list(args) if args is not None else None, prog_name=prog_name)


__all__ = ["CornpipeGroup", "cli", "main", "one_line"]
