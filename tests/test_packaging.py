"""An install adds one import name, `cornpipe`, and the CLI reaches every part through it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _source_files() -> list[str]:
    """The files a fresh clone has (tracked, or new and not ignored), relative to the root."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout to know which files are source")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if (ROOT / line).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel pip builds from a copy of the source tree (the checkout itself stays untouched)."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = tmp_path_factory.mktemp("src") / "cornpipe-src"
    for rel in _source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(src)], check=True, capture_output=True, text=True)
    (found,) = dist.glob("cornpipe-*.whl")
    return found


def test_the_wheel_holds_one_top_level_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"cornpipe", next(t for t in top if t.endswith(".dist-info"))}
    assert not any(t.startswith(("cli", "train", "loaders", "models", "bench", "tests")) for t in top)
    for module in ("cornpipe/__init__.py", "cornpipe/cli/__init__.py", "cornpipe/train.py", "cornpipe/predict.py",
                   "cornpipe/errors.py", "cornpipe/loaders/__init__.py", "cornpipe/models/__init__.py",
                   "cornpipe/shards/shard_set.py", "cornpipe/runs/config.py", "cornpipe/bench/gpu_check.sh"):
        assert module in names
    assert not any("/tests/" in n or n.startswith("cornpipe/tests") for n in names)


def test_the_wheel_declares_extras_and_a_bare_install_needs_no_compiler(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    bare = [r for r in requires if "extra ==" not in r]
    assert not any(r.startswith(("ffcv", "nvidia-dali")) for r in bare), bare  # FFCV compiles against apt libs
    assert any(r.startswith("tomli") and "python_version" in r for r in bare)
    for extra in ("ffcv", "dali", "dali-cuda13", "all", "export", "audit"):
        assert f"Provides-Extra: {extra}" in meta
    assert any(r.startswith("nvidia-dali-cuda120") and 'extra == "dali"' in r for r in requires)
    assert any(r.startswith("nvidia-dali-cuda130") and 'extra == "dali-cuda13"' in r for r in requires)
    assert any(r.startswith("onnxruntime") and 'extra == "export"' in r for r in requires)
    assert any(r.startswith("cleanlab") and 'extra == "audit"' in r for r in requires)
    # `all` installs DALI beside the torch PyPI serves, which is built for CUDA 13 (torch.version.cuda)
    assert any(r.startswith("cornpipe[") and "dali-cuda13" in r and 'extra == "all"' in r for r in requires)
    assert not any("dali]" in r.replace(" ", "") or "dali," in r for r in requires if 'extra == "all"' in r)
    assert any(r.startswith("psutil") for r in bare)  # the resident store's CPU memory cap reads it
    assert "cornpipe = cornpipe.cli:main" in entry_points


def test_the_wheel_carries_the_apache_license(wheel: Path) -> None:
    """A redistributor reads the licence from the wheel's metadata and finds its full text beside it."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        text = zf.read(license_file).decode()
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    assert "Apache License" in text and "Version 2.0, January 2004" in text

def test_python_m_cornpipe_runs_the_cli(tmp_path: Path) -> None:
    """From any folder (not the checkout): the install's one name is enough."""
    out = subprocess.run([sys.executable, "-m", "cornpipe", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    for command in ("synth", "convert", "inspect", "verify", "train", "report", "predict", "bench"):
        assert f"  {command} " in out
    for generic in ("loaders", "models", "bench", "train", "cli"):
        probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({generic!r}) is not None)"
        assert subprocess.run([sys.executable, "-c", probe], cwd=tmp_path).returncode == 0, \
            f"the install put a top-level {generic!r} on sys.path"
