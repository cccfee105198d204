"""PLACEHOLDER (being written): synth, convert, inspect, verify commands."""
import click


def _todo() -> None:
    raise click.ClickException("not implemented yet")


@click.command()
def synth() -> None:
    _todo()


@click.command()
def convert() -> None:
    _todo()


@click.command("inspect")
def inspect_command() -> None:
    _todo()


@click.command()
def verify() -> None:
    _todo()
