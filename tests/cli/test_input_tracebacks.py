"""Options and surroundings that ended in a traceback (issue 26): seeds out of range, a bootstrap size
no memory holds, a closed stdout, a deleted working folder. Each is one `Error:` line before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_run, error_line

from cornpipe.errors import ConfigError
from cornpipe.runs.config import TrainConfig

pytestmark = pytest.mark.timeout(180)
run = cli_run
TINY = ("--model", "resnet_plus_tiny", "--image-size", 32, "--batch-size", 8, "--loader", "torch",
        "--epochs", 1, "--device", "cpu")


@pytest.mark.parametrize("option, value", [("--seed", -1), ("--seed", 2**63), ("--fold-seed", -1),
                                           ("--fold-seed", 2**64)])
def test_train_seeds_out_of_range(tiny_shards: Path, tmp_path: Path, option: str, value: int) -> None:
    result = run("train", tiny_shards, "--out", tmp_path / "run", *TINY, option, value)
    assert result.exit_code == 1
    name = option.lstrip("-").replace("-", "_")
    assert error_line(result) == f"Error: {name} must be in 0..2**63-1 (got {value})"
    assert not (tmp_path / "run").exists()


def test_seed_range_is_checked_by_the_config_itself() -> None:
    with pytest.raises(ConfigError, match=r"seed must be in 0..2\*\*63-1 \(got -1\)"):
        TrainConfig(shards="s", out="o", seed=-1)
    TrainConfig(shards="s", out="o", seed=2**63 - 1, fold_seed=2**63 - 1)


def test_cv_fold_seed_out_of_range(tiny_shards: Path, tmp_path: Path) -> None:
    result = run("cv", tiny_shards, "--out", tmp_path / "cv", "--folds", 2, "--fold-seed", -1, *TINY)
    assert result.exit_code != 0
    assert "fold_seed must be in 0..2**63-1 (got -1)" in error_line(result) or "--fold-seed" in error_line(result)
    assert not (tmp_path / "cv").exists()


@pytest.mark.parametrize("command", [("convert", "{raw}", "{tmp}/out", "--formats", "wds"),
                                     ("synth", "{tmp}/synth", "--per-source", 1),
                                     ("bench", "loaders", "{shards}", "--backends", "torch")])
@pytest.mark.parametrize("seed", [-1, 2**64])
def test_other_commands_seeds_out_of_range(synth_raw: Path, tiny_shards: Path, tmp_path: Path,
                                           command: tuple, seed: int) -> None:
    args = [str(a).format(raw=synth_raw, tmp=tmp_path, shards=tiny_shards) for a in command]
    result = run(*args, "--seed", seed)
    assert result.exit_code == 2  # click's usage error: one `Error:` line naming the option
    assert "'--seed'" in error_line(result) and f"{seed} is not in the range" in error_line(result)
    assert not (tmp_path / "out").exists() and not (tmp_path / "synth").exists()


def test_a_huge_bootstrap_is_refused_before_epoch_1(tiny_shards: Path, tmp_path: Path) -> None:
    result = run("train", tiny_shards, "--out", tmp_path / "run", *TINY, "--bootstrap", 1_000_000_000)
    assert result.exit_code == 1
    assert error_line(result).startswith("Error: bootstrap must be at most 10000 resamples (got 1000000000)")
    assert "epoch 1" not in result.output
    assert not (tmp_path / "run").exists()


def _cornpipe_shell(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=150)


def test_inspect_with_stdout_closed(tiny_shards: Path, tmp_path: Path) -> None:
    """`cornpipe inspect shards >&-`: refused on stderr (a later open() could get fd 1 and take the output)."""
    done = _cornpipe_shell(f"'{sys.executable}' -m cornpipe inspect '{tiny_shards}' >&-", tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert [ln for ln in done.stderr.splitlines() if ln.startswith("Error:")] == [
        "Error: standard output is closed; send it somewhere (> /dev/null to discard it)"]


def test_inspect_from_a_deleted_folder(tiny_shards: Path, tmp_path: Path) -> None:
    done = _cornpipe_shell(f"mkdir gone && cd gone && rmdir ../gone && "
                           f"exec '{sys.executable}' -m cornpipe inspect '{tiny_shards}'", tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FATAL" not in done.stderr and "Traceback" not in done.stderr
    assert [ln for ln in done.stderr.splitlines() if ln.startswith("Error:")] == [
        "Error: the current folder no longer exists (deleted?); cd to a folder that exists and run again"]
