"""Exact values a user relies on, each once let through by a one-token change to the code (issue 22):
the EMA's average, the plateau schedule's direction, the frozen epoch count, TTA's mirror.

CPU, resnet_plus_tiny at 32 px on the conftest shard set; the training runs here are 1-3 short epochs.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import TINY as BASE_TINY
from conftest import cli_run, records
from PIL import Image
from torch import nn

from cornpipe.models import create_model
from cornpipe.predict import predict
from cornpipe.runs.config import TrainConfig
from cornpipe.runs.ema import ModelEma
from cornpipe.train import train

TINY = {**BASE_TINY, "bootstrap": 0, "verify": False}




# ------------------------------------------------------------------------------------------------
# EMA


def test_ema_weights_are_the_warmed_up_exponential_average() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ModelEma(model, decay=0.9)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for t in (1, 2, 3):
        with torch.no_grad():  # a "training step": new weights and BatchNorm statistics
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3))
        ema.update(model)
        d = min(0.9, (1 + t) / (10 + t))  # the documented warm-up: 0.18, 0.25, 0.31
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                expected[key] = d * expected[key] + (1 - d) * value
            else:  # num_batches_tracked: copied, not averaged
                expected[key] = value.clone()
    got = ema.module.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=key)
    assert ema.updates == 3


# ------------------------------------------------------------------------------------------------
# the plateau schedule


@pytest.fixture(scope="module")
def plateau_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four one-batch epochs on the plateau schedule, no warm-up, patience 0; read-only below.

    min_delta 0.05 (combined-monitor units) at lr 1e-3 makes this run's monitor alternate: better, not, better,
    not."""
    run = tmp_path_factory.mktemp("plateau") / "run"
    train(TrainConfig(shards=str(tiny_shards), out=str(run), epochs=4, max_batches=1, schedule="plateau",
                      warmup_epochs=0, plateau_patience=0, plateau_factor=0.5, min_delta=0.05, lr=1e-3, **TINY))
    return run


def test_plateau_halves_the_lr_exactly_after_the_epochs_that_did_not_improve(plateau_run: Path) -> None:
    lines = records(plateau_run)
    best, dropped, kept = -float("inf"), 0, 0
    for this, following in zip(lines, lines[1:], strict=False):
        improved = this["monitor"] > best + 0.05  # the monitor is higher-is-better (min_delta absolute)
        best = max(best, this["monitor"]) if improved else best
        expected = this["lr"] if improved else this["lr"] * 0.5
        assert following["lr"] == pytest.approx(expected), [(r["epoch"], r["lr"], r["monitor"]) for r in lines]
        dropped, kept = dropped + (not improved), kept + improved
    assert dropped and kept, f"this run no longer has both kinds of epoch; change min_delta: {lines}"


# ------------------------------------------------------------------------------------------------
# test-time augmentation


def test_tta_averages_the_image_and_its_horizontal_mirror(plateau_run: Path, tmp_path: Path) -> None:
    # a picture with no symmetry: a blob up and left on two gradients
    y, x = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    blob = 255 * torch.exp(-((x - 25) ** 2 + (y - 30) ** 2) / 300)
    pixels = torch.stack([x * 2, y * 2, blob], -1).clamp(0, 255).to(torch.uint8).numpy()
    image, mirror = tmp_path / "image.png", tmp_path / "mirror.png"
    Image.fromarray(pixels).save(image)
    Image.fromarray(pixels[:, ::-1].copy()).save(mirror)

    def rows(tta: bool) -> list[list[float]]:
        out = tmp_path / f"tta-{tta}.csv"
        predict(plateau_run / "last.pt", [image, mirror], out, tta=tta, device="cpu")
        return [[float(v) for k, v in row.items() if k.startswith("prob_") or k == "grade_pred"]
                for row in csv.DictReader(out.open())]

    plain, tta = rows(False), rows(True)
    mean = [(a + b) / 2 for a, b in zip(*plain, strict=True)]  # 3 position probabilities, grade_pred
    # same up to JPEG rounding (predict re-encodes each image as the shards did); the vertical mirror,
    # or no mirror at all, misses by 1e-3 on the probabilities and 0.05 on the grade with this model
    for row in tta:
        assert row[:3] == pytest.approx(mean[:3], abs=3e-4) and row[3] == pytest.approx(mean[3], abs=0.01)


# ------------------------------------------------------------------------------------------------
# fine-tuning: the trunk is frozen for exactly freeze_epochs


def test_the_trunk_is_frozen_for_exactly_freeze_epochs(tiny_shards: Path, tmp_path: Path) -> None:
    start = create_model("resnet_plus_tiny", num_positions=3, grade_scale=[0.0, 3.0, 5.0, 7.0, 9.0])
    torch.save(start.state_dict(), tmp_path / "start.pt")  # the trunk every run below starts from
    trunk = {k: v for k, v in start.state_dict().items() if not k.startswith("heads.")}
    run = tmp_path / "run"
    train(TrainConfig(shards=str(tiny_shards), out=str(run), epochs=1, max_batches=1, freeze_epochs=1,
                      init_weights=str(tmp_path / "start.pt"), **TINY))
    after_1 = torch.load(run / "last.pt", weights_only=True)["model"]
    for key, value in trunk.items():  # weights and BatchNorm statistics alike
        assert torch.equal(after_1[key], value), f"epoch 1 of freeze_epochs=1 changed {key}"

    result = cli_run("train", "--resume", run, "--epochs", "2")
    assert result.exit_code == 0, result.output
    after_2 = torch.load(run / "last.pt", weights_only=True)["model"]
    changed = {k for k, v in trunk.items() if not torch.equal(after_2[k], v)}
    assert any(k.endswith(".weight") and "conv" in k for k in changed), "epoch 2 did not train the trunk"
    assert any(k.endswith(".running_mean") for k in changed), "epoch 2 kept the trunk's BatchNorm statistics"
