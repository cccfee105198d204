"""`cornpipe --help`, every `cornpipe CMD --help` and each shell-completion TAB answer without importing
torch, sklearn, scipy, matplotlib, numba, numpy or PIL: all of them used to load before the CLI parsed a
word (issue 23). Each check runs in a fresh interpreter, since this test process has long imported them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from cornpipe.cli import cli

HEAVY = ("torch", "sklearn", "scipy", "matplotlib", "numba", "numpy", "PIL")  # only commands that work need them


def _fresh_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def _command_paths() -> list[list[str]]:
    """[[], ["synth"], ..., ["bench"], ["bench", "loaders"], ...]: the group and every (sub-)command."""
    paths: list[list[str]] = [[]]
    for name, command in cli.commands.items():
        paths.append([name])
        paths += [[name, sub] for sub in getattr(command, "commands", {})]
    return paths


def test_importing_the_cli_imports_no_heavy_library() -> None:
    done = _fresh_python("import sys, json, cornpipe.cli; "
                         f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_every_help_page_prints_without_a_heavy_library() -> None:
    """One interpreter walks every help page and names the first page after which a heavy module is loaded."""
    code = f"""
import json, sys
from cornpipe.cli import cli
for args in {_command_paths()!r}:
    try:
        cli.main([*args, "--help"], prog_name="cornpipe")
    except SystemExit as exc:
        assert exc.code == 0, (args, exc.code)
    loaded = [m for m in {HEAVY!r} if m in sys.modules]
    if loaded:
        print(json.dumps([args, loaded]), file=sys.stderr)
        sys.exit(3)
"""
    done = _fresh_python(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage: cornpipe bench train" in done.stdout  # the walk reached the last page


def test_tab_completion_answers_without_a_heavy_library() -> None:
    """What bash runs on `cornpipe tr<TAB>` (the script from `_CORNPIPE_COMPLETE=bash_source cornpipe`)."""
    code = ("import sys, json\nfrom cornpipe.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)")
    done = _fresh_python(code, _CORNPIPE_COMPLETE="bash_complete", COMP_WORDS="cornpipe tr", COMP_CWORD="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["plain,train"]
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []


def test_completion_script_names_the_command() -> None:
    done = _fresh_python("from cornpipe.cli import main\nmain()", _CORNPIPE_COMPLETE="bash_source")
    assert "_CORNPIPE_COMPLETE=bash_complete" in done.stdout
    assert "complete -o nosort -F _cornpipe_completion cornpipe" in done.stdout


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    for name in ("synth", "convert", "inspect", "verify", "train", "cv", "report", "predict", "models", "bench"):
        assert f"  {name} " in result.output


def test_help_runs_as_the_installed_command() -> None:
    done = subprocess.run([sys.executable, "-m", "cornpipe", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: cornpipe ")


def test_every_backend_name_has_a_module_that_builds_it() -> None:
    """The CLI offers `cornpipe.choices.BACKENDS` without importing torch; each one must be buildable."""
    from cornpipe.choices import BACKENDS
    from cornpipe.loaders.base import BACKEND_MODULES

    assert tuple(BACKEND_MODULES) == BACKENDS
