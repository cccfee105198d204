"""The trainer's wiring, end to end: a flag given on the command line is what the run used, and
best.pt (and val_predictions.csv) is the epoch the validation monitor chose -- checked on what the run
wrote, not on the parts.

CPU only, the tiny model on the conftest shard set (`tiny_shards`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY, cli_options, records

import cornpipe.train as train_module
from cornpipe.cli import cli
from cornpipe.runs.checkpoint import load_checkpoint
from cornpipe.runs.config import TrainConfig
from cornpipe.runs.early_stopping import monitor_value
from cornpipe.train import train

TINY_ARGS = cli_options({**TINY, "bootstrap": 0})
SCALE = [0.0, 3.0, 5.0, 7.0, 9.0]


def test_loss_weights_from_the_command_line_weigh_the_loss_the_run_used(tiny_shards: Path, tmp_path: Path) -> None:
    # 0.9 on position, 0.1 on grade: the two orders give clearly different totals here (the position
    # cross-entropy starts near ln 3, the normalised grade loss near 0.05)
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(tiny_shards), "--out", str(run), *TINY_ARGS, "--epochs", "1",
                                      "--max-batches", "2", "--loss-weights", "0.9,0.1"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["loss_weights"] == [0.9, 0.1]
    (record,) = records(run)
    for split in ("train", "val"):
        m = record[split]
        position, grade = m["position_loss"], m["grade_loss"]
        assert abs(0.9 * position + 0.1 * grade - (0.1 * position + 0.9 * grade)) > 0.1, m  # the test can tell
        # the epoch's mean loss is the same weighted sum of the mean parts (the weights are constants)
        assert m["loss"] == pytest.approx(0.9 * position + 0.1 * grade, rel=1e-4), (split, m)


def test_best_checkpoint_is_the_best_validation_epoch_and_only_changes_when_it_improves(
        tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saves: list[tuple[str, int]] = []  # (file name, epoch) of every checkpoint the trainer wrote
    real_save = train_module.save_checkpoint

    def recording_save(state: dict, path: Path) -> None:
        saves.append((Path(path).name, state["epoch"]))
        real_save(state, path)

    monkeypatch.setattr(train_module, "save_checkpoint", recording_save)
    # min_delta 0, no early stopping, plain weights (no EMA), a constant lr this high: the val monitor
    # of seed 2 rises to epoch 4, then falls back while the training-set monitor still rises
    cfg = TrainConfig(shards=str(tiny_shards), out=str(tmp_path / "run"), model="resnet_plus_tiny", image_size=32,
                      batch_size=16, workers=0, device="cpu", loader="torch", bootstrap=0, epochs=8,
                      min_delta=0.0, patience=0, lr=0.03, seed=2, warmup_epochs=0, schedule="plateau",
                      plateau_patience=100)
    result = train(cfg)
    lines = records(tmp_path / "run")
    val = [monitor_value(r["val"], "combined", SCALE) for r in lines]
    train_side = [monitor_value(r["train"], "combined", SCALE) for r in lines]
    expected_flags = [i == 0 or v > max(val[:i]) for i, v in enumerate(val)]
    best_epoch = 1 + val.index(max(val))  # the first epoch that reached the maximum
    # the run must hold what this test is about: an epoch that is not best after the best one, and a
    # training-set monitor that peaks elsewhere (so that choosing on it would pick another epoch)
    assert not all(expected_flags), val
    assert best_epoch != len(lines), val
    assert 1 + train_side.index(max(train_side)) != best_epoch, (train_side, val)

    assert [r["monitor"] for r in lines] == pytest.approx(val)  # the monitor is the validation one
    assert [r["best"] for r in lines] == expected_flags
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == best_epoch == result.best_epoch
    assert best["val"] == lines[best_epoch - 1]["val"]
    # best.pt is written on the best epochs only; last.pt on every epoch
    assert [e for name, e in saves if name == "best.pt"] == [i + 1 for i, f in enumerate(expected_flags) if f]
    assert [e for name, e in saves if name == "last.pt"] == list(range(1, len(lines) + 1))
    for key, value in result.model.state_dict().items():  # the run ends on the best weights
        assert torch.equal(value, best["model"][key]), key
    # val_predictions.csv is that best epoch's prediction for every val image, not the last epoch's
    with (tmp_path / "run" / "val_predictions.csv").open(newline="") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == best["val"]["n_samples"]
    assert sum(p["position_true"] == p["position_pred"] for p in preds) / len(preds) == pytest.approx(
        best["val"]["position_accuracy"], abs=1e-12)
    mae = sum(abs(float(p["grade_pred"]) - float(p["grade_true"])) for p in preds) / len(preds)
    assert mae == pytest.approx(best["val"]["grade_mae"], rel=1e-5)
    assert mae != pytest.approx(lines[-1]["val"]["grade_mae"], rel=1e-5)


@pytest.mark.parametrize("jitter", [0.0, 0.4])
def test_jitter_is_the_colour_jitter_of_the_train_loader_and_never_of_validation(jitter: float) -> None:
    from cornpipe.runs.build import build_run

    cfg = TrainConfig(model="resnet_plus_tiny", image_size=32, device="cpu", jitter=jitter)
    run = build_run(cfg, ["lower", "middle", "upper"], SCALE)
    augment = run.train_request(100)["augment"]
    assert (augment.brightness, augment.contrast, augment.saturation) == (jitter, jitter, jitter)
    assert augment.hflip and augment.vflip  # only the colour part changes
    assert run.val_request().get("augment") in (None, False)


def test_jitter_from_the_command_line_is_recorded_and_a_negative_one_is_one_error_line(
        tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(tiny_shards), "--out", str(run), *TINY_ARGS, "--epochs", "1",
                                      "--max-batches", "1", "--jitter", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["jitter"] == 0.0
    bad = CliRunner().invoke(cli, ["train", str(tiny_shards), "--out", str(tmp_path / "bad"), *TINY_ARGS,
                                   "--jitter", "-0.1"])
    assert bad.exit_code != 0
    assert bad.output.strip().splitlines()[-1].startswith("Error: jitter"), bad.output
