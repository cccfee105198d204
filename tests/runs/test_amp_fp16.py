"""The fp16 + GradScaler training path, run on the CPU (CPU autocast supports float16 in torch >= 2.4),
so that the suite executes the path every CUDA run takes by default; and the scaler stays off under bf16.

resnet_plus_tiny at 32 px on the conftest shard set, one epoch of two batches per run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY as BASE_TINY

from cornpipe.models import create_model
from cornpipe.runs.config import TrainConfig, resolve_runtime
from cornpipe.train import train

TINY = {**BASE_TINY, "bootstrap": 0, "verify": False, "epochs": 1, "max_batches": 2}


def test_fp16_is_allowed_on_the_cpu_but_never_chosen_there() -> None:
    assert resolve_runtime(TrainConfig(device="cpu", amp="fp16"), cuda_available=False).amp == "fp16"
    assert resolve_runtime(TrainConfig(device="cpu"), cuda_available=False).amp == "off"  # auto


@pytest.fixture(scope="module")
def start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Initial weights every run here starts from (so two runs differ only by their precision)."""
    path = tmp_path_factory.mktemp("start") / "start.pt"
    torch.manual_seed(0)
    model = create_model("resnet_plus_tiny", num_positions=3, grade_scale=[0.0, 3.0, 5.0, 7.0, 9.0])
    torch.save(model.state_dict(), path)
    return path


def run(shards: Path, out: Path, start: Path, amp: str) -> dict:
    # SGD: its step is proportional to the gradient, so gradients left 65536x too large before the
    # clipping (and divided by 65536 after it) would leave the weights where they started
    train(TrainConfig(shards=str(shards), out=str(out), amp=amp, optimizer="sgd", grad_clip=1.0,
                      init_weights=str(start), **TINY))
    assert json.loads((out / "config.json").read_text())["amp"] == amp
    return torch.load(out / "last.pt", weights_only=True)


def test_fp16_with_the_grad_scaler_clips_the_true_gradients(tiny_shards: Path, tmp_path: Path,
                                                            start: Path) -> None:
    fp32 = run(tiny_shards, tmp_path / "fp32", start, "off")
    fp16 = run(tiny_shards, tmp_path / "fp16", start, "fp16")
    assert fp16["scaler"]["scale"] == 65536.0  # the scaler ran, and no step overflowed
    assert fp32["scaler"] == {}  # a disabled scaler saves nothing
    # only the parameters move with the gradient (BatchNorm statistics move without one)
    initial = torch.load(start, weights_only=True)
    names = [k for k, v in initial.items() if v.is_floating_point() and "running_" not in k]
    moved = torch.cat([(fp32["model"][k] - initial[k]).flatten() for k in names])
    apart = torch.cat([(fp16["model"][k] - fp32["model"][k]).flatten() for k in names])
    assert moved.norm() > 1e-3  # the fp32 run learned something (clipped to norm 1, lr 0.05 / 10 warm-up)
    # fp16 rounding keeps the runs a few percent of a step apart; gradients clipped while still
    # scaled leave the fp16 run a whole step behind
    assert apart.norm() < 0.25 * moved.norm()


def test_bf16_trains_without_a_grad_scaler(tiny_shards: Path, tmp_path: Path, start: Path) -> None:
    bf16 = run(tiny_shards, tmp_path / "bf16", start, "bf16")
    # bfloat16 has float32's range: nothing to scale, and a scaler would skip (not report) a step
    # whose gradient is inf/NaN
    assert bf16["scaler"] == {}
    assert all(torch.isfinite(v).all() for v in bf16["model"].values() if v.is_floating_point())
