"""`cornpipe` command line: a thin edge over importable functions.

Commands parse options, build a config and call a library function. Library errors
(`CornpipeError`) become a one-line `Error: <cause>` here, never a traceback.
"""

from __future__ import annotations

import sys

import click

from bench.commands import bench
from loaders.base import CornpipeError
from loaders.commands import convert, inspect_command, synth, verify
from models.commands import predict_command, report_command
from train import train_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cornpipe")
def cli() -> None:
    """cornpipe: convert maize-disease surveys once, feed them fast, train a two-task model."""


for _command in (synth, convert, inspect_command, verify, train_command, report_command,
                 predict_command, bench):
    cli.add_command(_command)


def main() -> None:
    try:
        cli.main(prog_name="cornpipe", standalone_mode=True)
    except CornpipeError as exc:  # a library error that escaped a command's own handling
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
