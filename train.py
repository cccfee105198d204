"""PLACEHOLDER (being written): training loop, `cornpipe train`, `report`, `predict`."""
import click


@click.command("train")
def train_command() -> None:
    raise click.ClickException("not implemented yet")


@click.command("report")
def report_command() -> None:
    raise click.ClickException("not implemented yet")


@click.command("predict")
def predict_command() -> None:
    raise click.ClickException("not implemented yet")
