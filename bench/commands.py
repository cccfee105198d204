"""PLACEHOLDER (being written): bench group."""
import click


@click.group()
def bench() -> None:
    """Benchmarks."""
