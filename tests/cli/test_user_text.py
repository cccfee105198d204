"""Text a user gave (paths, folder names) and settings printed in brackets reach the screen whole: rich read
`[device cpu, amp off, ...]` and a folder named `[exp]run` as style tags and dropped them."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

from click.testing import CliRunner

from cornpipe.cli import cli

ROOT = Path(__file__).resolve().parents[2]  # the repository root is the `cornpipe` package
PARTS = ("cli", "runs", "shards", "loaders", "models", "bench")  # beside train.py and predict.py at the root
WIDE = {"COLUMNS": "1000"}  # rich wraps at 80 columns off a terminal; these tests read whole lines
SETTINGS = re.compile(r"\[device cpu, amp \w+, compile \w+, channels_last \w+, threads \d+, loader torch, oversample balanced\]")


def test_train_prints_its_settings_and_a_bracketed_run_folder(tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "[exp]run"
    result = CliRunner().invoke(cli, ["train", str(tiny_shards), "--out", str(out), "--model", "resnet_plus_tiny",
                                      "--image-size", "32", "--batch-size", "8", "--epochs", "1",
                                      "--max-batches", "1", "--workers", "0", "--bootstrap", "0"], env=WIDE)
    assert result.exit_code == 0, result.output
    start = next(line for line in result.output.splitlines() if line.startswith("training "))
    assert f"on {tiny_shards} " in start
    assert f"-> {out}  " in start
    assert SETTINGS.search(start), start
    assert f"report: {out / 'report.md'}" in result.output


def test_inspect_prints_a_bracketed_shard_folder(tiny_shards: Path, tmp_path: Path) -> None:
    shards = shutil.copytree(tiny_shards, tmp_path / "[survey]shards")
    result = CliRunner().invoke(cli, ["inspect", str(shards)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{shards}: found ")


def _console_calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Console"]


def test_every_console_prints_text_as_given() -> None:
    """Every rich Console cornpipe makes reads no markup, so no path, label or message is taken for a style
    tag (rich.markup.escape at each print would be one forgotten call away from the same bug); styled
    words use `style=` or rich.text.Text instead."""
    sources = [*ROOT.glob("*.py"), *(p for part in PARTS for p in (ROOT / part).rglob("*.py"))]
    made = {p.relative_to(ROOT): _console_calls(p) for p in sources}
    made = {path: calls for path, calls in made.items() if calls}
    assert made, "no Console found: the scan is broken"
    reading_markup = [f"{path}:{call.lineno}" for path, calls in made.items() for call in calls
                      if not any(k.arg == "markup" and isinstance(k.value, ast.Constant) and k.value.value is False
                                 for k in call.keywords)]
    assert reading_markup == []
