"""The trainer on CUDA: torch.compile + FP16 GradScaler + channels_last + EMA for two epochs, a resume
that carries the GradScaler's state, checkpoints that load on a CPU, and `cornpipe predict` on CUDA.

Run by `pytest -m gpu` (the pytest step of bench/gpu_check.sh); skipped without CUDA. The tiny model at
32 px, two batches an epoch: well under a minute on one GPU, most of it the one torch.compile.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import records

from cornpipe.cli import cli
from cornpipe.models import create_model
from cornpipe.runs.checkpoint import inference_weights, load_checkpoint, save_checkpoint
from cornpipe.runs.config import TrainConfig
from cornpipe.runs.run_dir import TrainResult
from cornpipe.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA_RUN = dict(model="resnet_plus_tiny", image_size=32, batch_size=16, workers=1, loader="resident", device="cuda",
                amp="fp16", compile=True, channels_last=True, ema=True, bootstrap=0, max_batches=2)
POSITIONS = ["lower", "middle", "upper"]


@pytest.fixture(scope="module")
def cuda_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    """Two compiled FP16 epochs on CUDA; read-only for the tests below."""
    run = tmp_path_factory.mktemp("gpu") / "run"
    result = train(TrainConfig(shards=str(tiny_shards), out=str(run), epochs=2, **CUDA_RUN))
    return run, result


def test_compiled_fp16_channels_last_ema_run_on_cuda(cuda_run: tuple[Path, TrainResult]) -> None:
    run, result = cuda_run
    config = json.loads((run / "config.json").read_text())
    assert (config["device"], config["amp"], config["compile"], config["channels_last"], config["ema"]) == (
        "cuda", "fp16", True, True, True)
    lines = records(run)
    assert [r["epoch"] for r in lines] == [1, 2]
    for record in lines:
        for split in ("train", "val"):
            assert math.isfinite(record[split]["loss"]) and record[split]["images_per_s"] > 0, (split, record)
    # what was evaluated and kept: the EMA weights, on the GPU, in channels_last
    weight = next(p for p in result.model.parameters() if p.ndim == 4)
    assert weight.device.type == "cuda" and weight.is_contiguous(memory_format=torch.channels_last)
    last = load_checkpoint(run / "last.pt")
    assert last["ema"]["updates"] == 2 * 2  # every step of both epochs
    scaler = last["scaler"]  # an enabled GradScaler's state, saved for --resume
    assert scaler["scale"] > 0 and {"growth_factor", "backoff_factor", "_growth_tracker"} <= set(scaler)


def test_cuda_checkpoints_load_and_run_on_a_cpu(cuda_run: tuple[Path, TrainResult]) -> None:
    run, _ = cuda_run
    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(run / name)  # map_location="cpu", weights_only=True
        weights = inference_weights(state)
        assert all(t.device.type == "cpu" for t in weights.values())
        model = create_model(state["config"]["model"], num_positions=len(state["data"]["positions"]),
                             grade_scale=state["data"]["grade_scale"], grade_head=state["config"]["grade_head"])
        model.load_state_dict(weights)  # the raw module's keys: no torch.compile "_orig_mod." prefix
        model.eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 32, 32))  # (B, 3, H, W)
        assert out["position"].shape == (2, 3) and all(torch.isfinite(v).all() for v in out.values())


def test_resume_on_cuda_carries_the_grad_scaler_state(cuda_run: tuple[Path, TrainResult], tmp_path: Path) -> None:
    run, _ = cuda_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    state = load_checkpoint(copy / "last.pt")
    # a scale a fresh GradScaler never has (it starts at 65536 and grows only every 2000 steps)
    state["scaler"]["scale"] = 1024.0
    save_checkpoint(state, copy / "last.pt")
    result = CliRunner().invoke(cli, ["train", "--resume", str(copy), "--epochs", "3", "--no-compile"])
    assert result.exit_code == 0, result.output
    resumed = load_checkpoint(copy / "last.pt")
    assert resumed["epoch"] == 3 and [r["epoch"] for r in records(copy)] == [1, 2, 3]
    assert resumed["scaler"]["scale"] <= 1024.0  # carried on (halved by an overflow at most), not reset
    assert resumed["ema"]["updates"] == state["ema"]["updates"] + 2


def test_predict_on_cuda_agrees_with_predict_on_cpu(cuda_run: tuple[Path, TrainResult], synth_raw: Path,
                                                    tmp_path: Path) -> None:
    run, _ = cuda_run
    images = [str(p) for p in sorted(synth_raw.rglob("*.jpg"))[:6]]
    rows = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / f"{device}.csv"
        result = CliRunner().invoke(cli, ["predict", str(run / "best.pt"), *images, "--out", str(out),
                                          "--device", device, "--batch-size", "4"])
        assert result.exit_code == 0, result.output
        assert "predicted 6 image(s), 0 unreadable" in result.output
        with out.open(newline="") as f:
            rows[device] = list(csv.DictReader(f))
    for gpu, cpu in zip(rows["cuda"], rows["cpu"], strict=True):
        assert gpu["path"] == cpu["path"] and gpu["error"] == "" and gpu["position_pred"] in POSITIONS
        for name in POSITIONS:  # FP16 autocast on CUDA, float32 on the CPU
            assert abs(float(gpu[f"prob_{name}"]) - float(cpu[f"prob_{name}"])) < 0.02, (gpu, cpu)
        assert abs(float(gpu["grade_pred"]) - float(cpu["grade_pred"])) < 0.1, (gpu, cpu)
