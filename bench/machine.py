"""Facts about the machine a benchmark ran on, saved beside every number it produced.

Nothing here imports ffcv or DALI: versions come from package metadata, so this works on a bare
GPU machine that has neither.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _metadata
import os
import platform
from pathlib import Path
from typing import Any

# distribution name -> key in the "libraries" object
_LIBRARIES: tuple[tuple[str, str], ...] = (
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("ffcv", "ffcv"),
    ("numpy", "numpy"),
    ("pillow", "pillow"),
    ("opencv-python", "opencv"),
    ("opencv-python-headless", "opencv"),
)


def usable_cores() -> int:
    """CPU cores this process may run on (affinity mask), which is what `--workers` defaults to."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def memory_total_gb(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)  # kB -> GiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _dist_version(name: str) -> str | None:
    try:
        return _metadata.version(name)
    except _metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    """Installed versions (None = not installed) of the libraries the numbers depend on."""
    versions: dict[str, str | None] = {}
    for dist, key in _LIBRARIES:
        version = _dist_version(dist)
        if version is not None or key not in versions:
            versions[key] = version
    dali = None
    for dist in _metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            dali = f"{dist.version} ({name})"
            break
    versions["dali"] = dali
    try:
        from PIL import features

        versions["libjpeg_turbo"] = str(bool(features.check_feature("libjpeg_turbo")))
    except Exception:  # Pillow missing or built without the feature table
        versions["libjpeg_turbo"] = None
    return versions


def gpu_facts() -> dict[str, Any]:
    """GPU name, count, memory and the CUDA/cuDNN versions torch was built with; {} without CUDA."""
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    props = torch.cuda.get_device_properties(0)
    return {
        "name": torch.cuda.get_device_name(0),
        "count": torch.cuda.device_count(),
        "memory_gb": round(props.total_memory / 1024**3, 1),
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def machine_facts() -> dict[str, Any]:
    """Everything a reader needs to judge a number: cores, CPU, memory, GPU, library versions, date."""
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cores": usable_cores(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gb": memory_total_gb(),
        "gpu": gpu_facts() or None,
        "libraries": library_versions(),
    }


def describe(facts: dict[str, Any]) -> str:
    """One line for a table caption: '2 cores AMD EPYC, 23.5 GiB, no GPU, torch 2.4.1'."""
    gpu = facts.get("gpu")
    gpu_text = f"{gpu['name']} x{gpu['count']}" if gpu else "no GPU"
    libs = facts.get("libraries", {})
    return (f"{facts['cores']} cores {facts['cpu_model']}, {facts.get('memory_gb')} GiB, {gpu_text}, "
            f"torch {libs.get('torch')}, {facts['date_utc']}")


if __name__ == "__main__":  # `python -m bench.machine [FILE]`: print (and save) the facts as JSON
    import json
    import sys

    text = json.dumps(machine_facts(), indent=2)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text + "\n")
    print(text)
