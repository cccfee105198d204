"""docs: every `cornpipe` command, sub-commands of groups included, is named in README.md and has help text
(as sqlite-utils' tests/test_docs.py does for its CLI reference). A new command fails here until the
README lists it."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from conftest import cli_run

from cornpipe.cli import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    """Every command below `group` as (its words after `cornpipe`, the command), groups and their
    sub-commands alike, depth first."""
    found = []
    for name, command in sorted(group.commands.items()):
        found.append(((*path, name), command))
        if isinstance(command, click.Group):
            found.extend(commands(command, (*path, name)))
    return found


COMMANDS = commands(cli)
IDS = [" ".join(words) for words, _ in COMMANDS]


def test_the_walk_reaches_the_sub_commands_of_groups() -> None:
    # a walk that stopped at the top level would pass every test below while missing `bench loaders`
    assert {"train", "bench", "bench loaders", "bench train"} <= set(IDS)


@pytest.mark.parametrize("words", [words for words, _ in COMMANDS], ids=IDS)
def test_every_command_is_in_the_readme(words: tuple[str, ...]) -> None:
    # `cornpipe bench loaders`, not only `cornpipe bench`; `cornpipe train` is not found in `cornpipe trainer`
    name = " ".join(words)
    assert re.search(rf"cornpipe {re.escape(name)}(?![\w-])", README), f"README.md never names `cornpipe {name}`"


@pytest.mark.parametrize(("words", "command"), COMMANDS, ids=IDS)
def test_every_command_has_help_text(words: tuple[str, ...], command: click.Command) -> None:
    assert (command.help or "").strip(), f"`cornpipe {' '.join(words)}` has no help text"
    result = cli_run(*words, "--help")
    assert result.exit_code == 0, result.output
    first_line = " ".join(command.help.strip().splitlines()[0].split())
    assert first_line in " ".join(result.output.split())  # click re-wraps the text to the terminal
