"""Session fixtures shared by every test module: one tiny synthetic survey and its shard set."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SYNTH_PER_SOURCE = 6  # images per source folder (9 sources -> 54 images)
SYNTH_IMAGE_SIZE = 96  # px
SHARDS_MAX_RESOLUTION = 96  # px, longest side in the shard set
# The bare GPU machine has neither FFCV nor DALI: there the shard sets are tar shards only, and the
# tests of those backends skip themselves (`needs_library`).


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package (`nvidia`) is missing
        return False


FORMATS = ("beton", "wds") if installed("ffcv") else ("wds",)


def needs_library(backend: str) -> None:
    """Skip the calling test when `backend`'s library (FFCV, DALI) is not installed."""
    module = {"ffcv": "ffcv", "dali": "nvidia.dali"}.get(backend)
    if module is not None and not installed(module):
        pytest.skip(f"{backend} backend: {module} is not installed")

def cli_run(*args: object):
    """`cornpipe ARGS...` through click's CliRunner; a traceback fails the test (catch_exceptions=False)."""
    from click.testing import CliRunner

    from cornpipe.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def error_line(result) -> str:
    """The one `Error:` line of a command's output (the test fails when there is not exactly one)."""
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def jpeg_bytes(seed: int, size: int = 40) -> bytes:
    """A small noise JPEG, different for every seed."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic survey in the team's folder layout (9 sources, labels.csv each)."""
    from cornpipe.shards.synth import make_synthetic

    out = tmp_path_factory.mktemp("synth") / "raw"
    make_synthetic(out, per_source=SYNTH_PER_SOURCE, image_size=SYNTH_IMAGE_SIZE, seed=0, workers=1)
    return out


@pytest.fixture(scope="session")
def tiny_shards(synth_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`synth_raw` converted (jpg mode, longest side 96 px, default 0.2 validation share). Read-only."""
    from cornpipe.shards.convert import convert_dataset

    out = tmp_path_factory.mktemp("shards") / "shards"
    convert_dataset(synth_raw, out, max_resolution=SHARDS_MAX_RESOLUTION, write_mode="jpg", workers=2, seed=0,
                    formats=FORMATS)
    return out
