"""The rooms hold: every module's imports point inwards and down (README, "How the code is laid out").

    cli -> train / runs / predict -> loaders, models -> shards (format) -> grades, errors

Parsed with `ast`, so an import inside a function counts as much as one at the top. The one exception
is a module's `if __name__ == "__main__":` block: an entry point (`python -m cornpipe.bench.train_bench`
as a benchmark's child process) runs as `__main__`, a module of its own.

Within a part too, no two files import each other (directly or round a longer loop): `test_no_module_imports_itself_back`.
"""

from __future__ import annotations

import ast
import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the `cornpipe` package
PARTS = ("cli", "train", "predict", "runs", "loaders", "models", "shards", "grades", "choices", "errors", "bench")

# part -> the cornpipe parts it may import (itself always)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "grades": {"errors"},  # the grade scale's one rule: the floor models/ and shards/ share
    "choices": set(),  # the names settings choose from (no torch): the floor the CLI and every part read
    "models": {"errors", "grades", "choices"},
    "shards": {"errors", "grades", "choices"},
    "loaders": {"errors", "grades", "choices", "shards"},
    "runs": {"errors", "grades", "choices", "models", "loaders", "shards"},
    "predict": {"errors", "grades", "choices", "models", "loaders", "shards", "runs"},
    "train": {"errors", "grades", "choices", "models", "loaders", "shards", "runs"},
    "bench": {"errors", "grades", "choices", "models", "loaders", "shards", "runs"},
    "cli": {"errors", "grades", "choices", "models", "loaders", "shards", "runs", "train", "predict", "bench"},
    "package": {"cli", "predict"},  # cornpipe/__init__.py (its lazy `load_model`), __main__.py
}
# The read side uses the format's reader and contract, never the machinery that writes shard sets.
SHARDS_READ_SIDE = {"fields", "shard_set", "discover", "split", "imageio"}


@pytest.fixture(autouse=True)
def no_collection_while_parsing() -> Iterator[None]:
    """CPython 3.11's ast.parse fails ("AST constructor recursion depth mismatch") when a garbage collection
    inside it runs a finaliser that raises (an earlier test's SharedMemory.__del__ did, in CI): collect first,
    then parse with the collector off."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def modules() -> list[Path]:
    """Every product module: the top-level files and each part's files, inner rooms (loaders/backends/) too."""
    found = [p for p in ROOT.glob("*.py")]
    for part in PARTS:
        found += sorted((ROOT / part).rglob("*.py"))
    return sorted(found)


def module_name(path: Path) -> str:
    """cornpipe.runs.cv for runs/cv.py; cornpipe.loaders for loaders/__init__.py."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("cornpipe", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def part_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if len(rel.parts) > 1:
        return rel.parts[0]
    return rel.stem if rel.stem in PARTS else "package"


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(path: Path, *, runtime_only: bool = False) -> Iterator[tuple[int, str]]:
    """(line, dotted module) of every absolute import of `path`, outside its __main__ guard (and, with
    `runtime_only`, outside `if TYPE_CHECKING:` blocks, which never run)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = {id(n) for node in tree.body if _is_main_guard(node) or (runtime_only and _is_type_checking(node))
            for n in ast.walk(node)}
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


def import_graph() -> dict[str, set[str]]:
    """module -> the cornpipe modules it imports (`from cornpipe.loaders import make_loader` names the
    package cornpipe.loaders; `from cornpipe.shards import fields` the module cornpipe.shards.fields)."""
    known = {module_name(p): p for p in modules()}
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        graph[name] = set()
        for _line, imported in imports(path, runtime_only=True):  # a type-only import loads nothing
            while imported and imported not in known:  # a name inside a module: the module
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                graph[name].add(imported)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import chain per cycle found (depth-first search over the graph)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current chain, 2: done

    def visit(node: str, chain: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*chain[chain.index(nxt):], node, nxt] if nxt in chain else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*chain, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


# Cycles in files the loaders/ restructuring (issue 21 item 4) rewrites: removed there, then delete the entry.
KNOWN_CYCLES: set[frozenset[str]] = set()  # none left; a new one needs a reason here


def test_no_module_imports_itself_back() -> None:
    """No file-level import cycles, within a part as much as between parts: a cycle means neither file
    can be read (or loaded) without the other. Package __init__ files count as modules."""
    assert [c for c in cycles(import_graph()) if frozenset(c) not in KNOWN_CYCLES] == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_only_the_run_builder_makes_models() -> None:
    """One place builds a run (cornpipe.runs.build): outside models/, nothing else calls create_model."""
    callers = []
    for path in modules():
        if part_of(path) == "models":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "create_model":
                callers.append(str(path.relative_to(ROOT)))
    assert sorted(set(callers)) == ["runs/build.py"]


def test_no_entry_point_hands_over_to_the_cli_but_the_package_s() -> None:
    """`python -m cornpipe.train` goes through `python -m cornpipe` (cornpipe/__main__.py): no module below the
    CLI names it, not even in its `__main__` block."""
    for path in modules():
        if part_of(path) in ("cli", "package"):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:
            if _is_main_guard(node):
                names = [n.module or "" for n in ast.walk(node) if isinstance(n, ast.ImportFrom)]
                names += [a.name for n in ast.walk(node) if isinstance(n, ast.Import) for a in n.names]
                assert not [n for n in names if n.startswith("cornpipe.cli")], path


# Functions the loaders/ restructuring (issue 21 item 4) splits: delete the entry when it is done.
KNOWN_LONG: set[str] = set()  # none left; a new one needs a reason here


def test_every_function_reads_on_one_screen() -> None:
    """No function in the product runs over 100 lines: past that it is two functions (STYLE.md)."""
    long = []
    for path in modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100:
                name = f"{path.relative_to(ROOT)}:{node.name}"
                if name not in KNOWN_LONG:
                    long.append(f"{name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
