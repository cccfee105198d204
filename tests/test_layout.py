"""The rooms hold: every module's imports point inwards and down (README, "How the code is laid out").

    cli -> train / runs / predict -> loaders, models -> shards (format) -> errors

Parsed with `ast`, so an import inside a function counts as much as one at the top. The one exception
is a module's `if __name__ == "__main__":` block: an entry point (`python -m cornpipe.train`) may hand
over to the CLI.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the `cornpipe` package
PARTS = ("cli", "train", "predict", "runs", "loaders", "models", "shards", "errors", "bench")

# part -> the cornpipe parts it may import (itself always)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "models": {"errors"},
    "shards": {"errors"},
    "loaders": {"errors", "shards"},
    "runs": {"errors", "models", "loaders", "shards"},
    "predict": {"errors", "models", "loaders", "shards", "runs"},
    "train": {"errors", "models", "loaders", "shards", "runs"},
    "bench": {"errors", "models", "loaders", "shards", "runs"},
    "cli": {"errors", "models", "loaders", "shards", "runs", "train", "predict", "bench"},
    "package": {"cli"},  # cornpipe/__init__.py, __main__.py
}
# The read side uses the format's reader and contract, never the machinery that writes shard sets.
SHARDS_READ_SIDE = {"fields", "shard_set", "discover", "split", "imageio"}


def modules() -> list[Path]:
    found = [p for p in ROOT.glob("*.py")]
    for part in PARTS:
        found += sorted((ROOT / part).glob("*.py"))
    return sorted(found)


def part_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if len(rel.parts) > 1:
        return rel.parts[0]
    return rel.stem if rel.stem in PARTS else "package"


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted module) of every absolute import of `path`, outside its __main__ guard."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = {id(n) for node in tree.body if _is_main_guard(node) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: use absolute `cornpipe.` imports"
            for alias in node.names:  # `from cornpipe.shards import fields` imports cornpipe.shards.fields
                yield node.lineno, f"{node.module}.{alias.name}"


def violations(path: Path) -> list[str]:
    part = part_of(path)
    rel = path.relative_to(ROOT)
    found = []
    for line, name in imports(path):
        top, *rest = name.split(".")
        where = f"{rel}:{line} imports {name}"
        if top in PARTS:
            found.append(f"{where}: first-party imports go through the one package name, cornpipe.{name}")
        if top == "click" and part != "cli":
            found.append(f"{where}: only cli/ imports click")
        if top != "cornpipe" or not rest:
            continue
        target = rest[0]
        if target not in PARTS or target == part:
            continue
        if target not in ALLOWED[part]:
            found.append(f"{where}: {part} may not import {target}")
        if part == "loaders" and target == "shards" and len(rest) > 1 and rest[1] not in SHARDS_READ_SIDE:
            found.append(f"{where}: loaders read shard sets; they never import the write machinery")
    return found


def test_every_part_is_found() -> None:
    parts = {part_of(p) for p in modules()}
    assert parts == {*PARTS, "package"}
    assert len(modules()) > 50


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_inwards(path: Path) -> None:
    assert violations(path) == []


def test_the_checker_catches_a_wrong_import(tmp_path: Path) -> None:
    """The rules are not vacuous: each kind of wrong import is reported."""
    for part, text in [("models", "from cornpipe.loaders import make_loader\n"),
                       ("models", "from cornpipe.runs.config import TrainConfig\n"),
                       ("loaders", "import click\n"),
                       ("loaders", "from cornpipe.shards.convert import convert_dataset\n"),
                       ("shards", "from cornpipe.loaders.base import Batch\n"),
                       ("runs", "from cornpipe.bench import isolate\n"),
                       ("train", "from cornpipe.cli import main\n"),
                       ("models", "from errors import CornpipeError\n")]:
        (tmp_path / part).mkdir(exist_ok=True)
        bad = tmp_path / part / "bad.py"
        bad.write_text(text)
        globals()["ROOT"] = tmp_path  # part_of() reads paths relative to ROOT
        try:
            assert violations(bad), f"{part}: {text.strip()} passed the check"
        finally:
            globals()["ROOT"] = Path(__file__).resolve().parents[1]
            bad.unlink()
