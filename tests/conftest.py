"""Shared by every test module: one tiny synthetic survey and its shard set (session fixtures), the tiny
training settings, and the helpers that read a run's metrics and drive the CLI."""

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

# The smallest training run that still exercises every step: CPU, a tiny net, 32 px, no loader workers.
TINY = dict(model="resnet_plus_tiny", image_size=32, batch_size=16, workers=0, device="cpu", bootstrap=50,
            loader="torch")
# what may differ between two identical runs: wall-clock measurements
TIMING_KEYS = {"time_s", "images_per_s", "data_wait_share"}


def cli_options(settings: dict) -> list[str]:
    """`TrainConfig` keyword settings as `cornpipe train` options: {"image_size": 32} -> ["--image-size", "32"]."""
    return [part for key, value in settings.items() for part in (f"--{key.replace('_', '-')}", str(value))]


def records(run: Path) -> list[dict]:
    """The run folder's metrics.jsonl, one dict per epoch."""
    from cornpipe.runs.run_dir import read_metrics

    return read_metrics(run / "metrics.jsonl")


def without_timing(record):
    """`record` without its wall-clock fields, at any depth: what two identical runs share."""
    if isinstance(record, dict):
        return {k: without_timing(v) for k, v in record.items() if k not in TIMING_KEYS}
    return record


def assert_same_weights(a: dict, b: dict) -> None:
    """Two checkpoints hold bit-identical model and EMA weights."""
    import torch

    for part in ("model", "ema"):
        x = a[part] if part == "model" else a[part]["module"]
        y = b[part] if part == "model" else b[part]["module"]
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), (part, key)


def needs_library(backend: str) -> None:
    """Skip the calling test when `backend`'s library (FFCV, DALI) is not installed."""
    module = {"ffcv": "ffcv", "dali": "nvidia.dali"}.get(backend)
    if module is not None and not installed(module):
        pytest.skip(f"{backend} backend: {module} is not installed")


@pytest.fixture()
def one_thread():
    """Tiny nets are all per-op overhead: on a shared 2-core machine two intra-op threads wait on
    each other (a 40-step run took 25 s instead of 0.4 s); one thread is faster for these sizes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def copy_with_a_damaged_tar(src: Path, copy: Path) -> Path:
    """Copy the shard set `src` to `copy` and flip one byte of its first training tar (same size: only
    the sha256 tells); returns that tar."""
    import shutil

    shutil.copytree(src, copy)
    tar = copy / "train-000000.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    return tar


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


def as_format_version_1(src: Path, out: Path) -> Path:
    """A copy of the shard set `src` as cornpipe wrote it before format version 2: each sample's tar
    members are .jpg .position .grade .id .json (no .cls, no .grade.txt), the manifest says version 1."""
    import json
    import tarfile

    from cornpipe.shards import fields as F
    from cornpipe.shards.manifest import sha256_file, write_manifest_hash
    from cornpipe.shards.shard_set import ShardSet
    from cornpipe.shards.writers import DALI_INDEX_VERSION, _tar_member

    out.mkdir()
    shards = ShardSet(src)
    manifest = json.loads((src / F.MANIFEST).read_text())
    for path in src.iterdir():
        if path.suffix not in (".tar", ".idx") and path.name not in (F.MANIFEST, F.MANIFEST_HASH):
            (out / path.name).write_bytes(path.read_bytes())
    for split in shards.splits:
        row = 0
        for tar, idx in shards.shards(split):
            lines = []
            with open(out / tar.name, "wb") as raw, \
                    tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as t:
                for _ in shards.index(idx):
                    key = F.sample_key(shards.samples(split)[row]["id"])
                    parts = []
                    for ext, member in (("jpg", "jpg"), ("position", "position"), ("grade", "grade"),
                                        ("id", "sample_id"), ("json", "json")):
                        offset, size = _tar_member(t, f"{key}.{ext}", shards.read_member(split, row, member))
                        parts.append(f"{ext} {offset} {size} {key}.{ext}")
                    lines.append(" ".join(parts))
                    row += 1
            (out / idx.name).write_text(f"{DALI_INDEX_VERSION} {len(lines)}\n" + "".join(f"{ln}\n" for ln in lines))
    manifest["format_version"] = 1
    for name in manifest["files"]:
        manifest["files"][name] = {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
    (out / F.MANIFEST).write_text(json.dumps(manifest, indent=1))
    write_manifest_hash(out)
    return out


@pytest.fixture(scope="session", autouse=True)
def real_cam_panel():
    """Training ends by drawing an activation-map panel (grad-cam: seconds a run on a CPU, dozens of runs in
    the suite); only tests/runs/test_explain.py is about it, and it asks for the real one (this value)."""
    from cornpipe.runs import run_dir

    real = run_dir._cam_panel
    run_dir._cam_panel = lambda run, console: None
    yield real
    run_dir._cam_panel = real


@pytest.fixture(scope="session")
def trained_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of the tiny model on `tiny_shards`, shared by the tests that use a trained model (predict,
    evaluate, load_model, calibration, ...): read-only, copy it before changing anything."""
    from cornpipe.runs.config import TrainConfig
    from cornpipe.train import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train(TrainConfig(shards=str(tiny_shards), out=str(out), **{**TINY, "epochs": 1}))
    return out


def shards_from_csv(raw: Path, header: str, rows: list[str]) -> Path:
    """A shard set converted (tar shards only) from a manifest CSV in `raw`: one noise JPEG per row, named by
    the row's first cell; `rows` are the CSV lines under `header`."""
    from cornpipe.shards.convert import convert_dataset

    for i, row in enumerate(rows):
        (raw / row.split(",")[0]).write_bytes(jpeg_bytes(i))
    (raw / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    out = raw / "shards"
    convert_dataset(None, out, manifest_csv=raw / "labels.csv", max_resolution=32, workers=1, formats=("wds",))
    return out


def field_lab_shards_of(n: int, tmp: Path) -> Path:
    """`n` noise images from a manifest CSV without source or stage, with an `origin` column: every fourth
    a field photo, the rest lab photos; positions and grades (0, 3) cycle."""
    return shards_from_csv(tmp, "path,position,grade,origin",
                           [f"img{i:02d}.jpg,{'lmt'[i % 3]},{(0, 3)[i % 2]},{'field' if i % 4 == 0 else 'lab'}"
                            for i in range(n)])
