"""The environment block (issue 23): what a run or an export ran on, without importing ffcv or DALI.
A trained run's config.json and checkpoints carrying it: tests/runs/test_export.py (it trains one)."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from cornpipe.runs.environment import environment, git_revision


def test_versions_device_and_cuda_are_recorded() -> None:
    env = environment("cpu")
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    for key in ("torch", "torchvision", "timm", "numpy"):
        assert env[key] == metadata.version(key)
    assert env["cuda"] == torch.version.cuda
    assert "cudnn" in env
    assert env["device_name"].startswith("cpu")


def test_absent_libraries_are_left_out_not_guessed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = metadata.version

    def version(name: str) -> str:
        if name == "ffcv" or name.startswith("nvidia-dali"):
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    env = environment("cpu")
    assert "ffcv" not in env and "dali" not in env
    assert env["torch"] == real("torch")


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture()
def checkout(tmp_path: Path) -> Path:
    repo = tmp_path / "cornpipe"
    repo.mkdir()
    (repo / "train.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "train.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    return repo


def test_git_revision_and_dirty_flag_of_a_checkout(checkout: Path) -> None:
    revision = git_revision.__wrapped__  # uncached: the cache holds one answer a process
    assert revision(checkout) == {"git_revision": _git(checkout, "rev-parse", "HEAD"), "git_dirty": False}
    (checkout / "train.py").write_text("x = 2\n")
    assert revision(checkout) == {"git_revision": _git(checkout, "rev-parse", "HEAD"), "git_dirty": True}


def test_no_revision_outside_a_checkout(checkout: Path, tmp_path: Path) -> None:
    """A plain install has none; nor has a package installed inside some other repository (a venv in a
    project's checkout): that revision is the project's, not cornpipe's."""
    revision = git_revision.__wrapped__
    plain = tmp_path / "site-packages" / "cornpipe"
    plain.mkdir(parents=True)
    assert revision(plain) == {}
    nested = checkout / "venv" / "cornpipe"
    nested.mkdir(parents=True)
    assert revision(nested) == {}
