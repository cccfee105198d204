"""What a run or an export ran on: library versions, CUDA, the device and cornpipe's code revision.

`environment(device)` is the `environment` block of config.json, of every checkpoint and of an export's
model_card.json: plain strings and booleans (a checkpoint stays loadable with weights_only=True).
Versions come from the installed distributions' metadata, so ffcv and DALI are never imported for it.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

# key -> the distributions that provide it (the first installed one wins): DALI ships one wheel per CUDA
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "cornpipe": ("cornpipe",),
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "timm": ("timm",),
    "numpy": ("numpy",),
    "ffcv": ("ffcv",),
    "dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"),
}
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the repository root IS the package
GIT_TIMEOUT_S = 2.0  # a hung git (network file system, lock) must not hold up a run's start


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The environment block: versions of what is installed (absent ones left out), CUDA/cuDNN, the
    device's name, and `git_revision`/`git_dirty` when cornpipe runs from a git checkout."""
    device = torch.device(device)
    env: dict[str, Any] = {"python": platform.python_version()}
    env.update(installed_versions())
    env["cuda"] = torch.version.cuda  # the CUDA torch was built for; None on a CPU-only build
    env["cudnn"] = _cudnn_version()
    env["device_name"] = device_name(device)
    env.update(git_revision())
    return env


def installed_versions(distributions: Mapping[str, Sequence[str]] = DISTRIBUTIONS) -> dict[str, str]:
    """{key: version} of each `distributions` entry that is installed."""
    versions = {}
    for key, names in distributions.items():
        for name in names:
            try:
                versions[key] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def _cudnn_version() -> str | None:
    if not torch.backends.cudnn.is_available():
        return None
    version = torch.backends.cudnn.version()  # e.g. 91200 for 9.12.0
    return None if version is None else f"{version // 10000}.{version // 100 % 100}.{version % 100}"


def device_name(device: torch.device) -> str:
    """`cuda:0 NVIDIA H100 80GB HBM3`, or `cpu <model name>` (the CPU's model from /proc/cpuinfo)."""
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return f"{device.type} {_cpu_model()}".strip()


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def git_revision(package_dir: Path = PACKAGE_DIR) -> dict[str, Any]:
    """{"git_revision": sha, "git_dirty": bool} when `package_dir` is the top of a git checkout (an
    installed wheel inside some other repository is not), else {}. Read once a process: the code a
    run imported at its start is what it runs."""
    top = _git(package_dir, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != package_dir.resolve():
        return {}
    revision = _git(package_dir, "rev-parse", "HEAD")
    if revision is None:
        return {}
    status = _git(package_dir, "status", "--porcelain", "--untracked-files=no")
    return {"git_revision": revision, **({} if status is None else {"git_dirty": bool(status)})}


def _git(cwd: Path, *args: str) -> str | None:
    """git's stdout, stripped; None when git is missing, fails or hangs."""
    try:
        done = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
