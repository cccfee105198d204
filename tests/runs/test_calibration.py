"""Calibration: temperature scaling fitted on validation, carried in best.pt, applied by predict/evaluate/export."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cornpipe import load_model
from cornpipe.cli import cli
from cornpipe.models import create_model
from cornpipe.runs.calibration import (
    apply_temperature,
    calibrate,
    calibrate_run,
    cv_calibration,
    ece,
    fit_temperature,
    scaled_softmax,
)
from cornpipe.runs.checkpoint import load_checkpoint
from cornpipe.runs.report import write_report
from cornpipe.shards.shard_set import ShardSet


def overconfident(n: int, classes: int, true_t: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax(z / true_t) is the labels' true distribution: over-confident by true_t."""
    rng = np.random.default_rng(seed)
    honest = rng.normal(0, 1.5, (n, classes))
    honest[np.arange(n), rng.integers(0, classes, n)] += 2.0
    p = scaled_softmax(honest, 1.0)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return honest * true_t, labels


@pytest.mark.parametrize("true_t", [0.6, 2.5])
def test_temperature_recovers_the_true_one_and_lowers_ece(true_t: float) -> None:
    logits, labels = overconfident(6000, 4, true_t)
    t = fit_temperature(logits, labels)
    assert abs(t - true_t) / true_t < 0.08
    raw = scaled_softmax(logits, 1.0)
    assert ece(scaled_softmax(logits, t), labels) < ece(raw, labels) / 2
    record = calibrate(raw, labels)  # from probabilities: log(p) are the logits up to a constant
    assert record["fitted"] and abs(record["temperature"] - t) < 1e-3 * t
    assert record["ece_after"] < record["ece_before"]


def test_ece_is_the_confidence_accuracy_gap() -> None:
    prob = np.tile([0.9, 0.1], (10, 1))  # confidence 0.9 everywhere
    assert ece(prob, [0] * 9 + [1]) == pytest.approx(0.0, abs=1e-9)  # 90 % right: calibrated
    assert ece(prob, [0] * 5 + [1] * 5) == pytest.approx(0.4)
    assert apply_temperature(prob, 1.0) is prob  # T = 1 leaves the raw probabilities alone


def test_too_small_or_single_class_validation_keeps_t_1() -> None:
    logits, labels = overconfident(20, 3, 3.0)
    small = calibrate(scaled_softmax(logits, 1.0), labels)
    assert small["temperature"] == 1.0 and not small["fitted"] and "20 validation samples" in small["reason"]
    one_class = calibrate(np.tile([0.8, 0.2], (100, 1)), np.zeros(100, dtype=int))
    assert one_class["temperature"] == 1.0 and "only 1 position class" in one_class["reason"]


@pytest.fixture(scope="module")
def run(trained_run: Path) -> Path:
    return trained_run


@pytest.fixture(scope="module")
def fitted(run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A copy of the tiny run with T fitted on its few validation samples (the threshold lowered to 2)."""
    copy = tmp_path_factory.mktemp("calib") / "fitted"
    shutil.copytree(run, copy)
    record = calibrate_run(copy, min_samples=2)
    assert record is not None and record["fitted"]
    return copy, record["temperature"]


def test_tiny_run_says_its_validation_is_too_small(run: Path) -> None:
    record = load_checkpoint(run / "best.pt")["data"]["calibration"]
    n = record["n"]
    assert n < 50 and record["temperature"] == 1.0 and not record["fitted"]
    report = (run / "report.md").read_text()
    section = report.split("## Calibration", 1)[1]
    assert f"Not fitted, T = 1**: {n} validation samples, fewer than the 50" in section
    assert "![reliability diagram](calibration.png)" in section and (run / "calibration.png").stat().st_size > 0


def test_fitted_run_report_states_t_and_ece(fitted: tuple[Path, float]) -> None:
    copy, t = fitted
    write_report(copy)
    section = (copy / "report.md").read_text().split("## Calibration", 1)[1]
    assert f"**T = {t:.3f}**" in section and "| raw |" in section and f"| calibrated (T = {t:.3g}) |" in section


def val_files(tiny_shards: Path, synth_raw: Path) -> list[Path]:
    return [synth_raw / s["path"] for s in ShardSet(tiny_shards).samples("val")]


def test_predict_applies_the_temperature(fitted: tuple[Path, float], tiny_shards: Path, synth_raw: Path,
                                         tmp_path: Path) -> None:
    copy, t = fitted
    files = val_files(tiny_shards, synth_raw)
    model = load_model(copy, device="cpu")
    assert model.temperature == pytest.approx(t)
    names = [f"prob_{p}" for p in model.positions]
    calibrated = np.array([[r[k] for k in names] for r in model.predict(files)])
    raw = np.array([[r[k] for k in names] for r in model.predict(files, raw=True)])
    assert np.allclose(calibrated, apply_temperature(raw, t), atol=1e-5)
    assert (calibrated.argmax(1) == raw.argmax(1)).all()
    if abs(t - 1) > 1e-3:
        assert np.abs(calibrated - raw).max() > 1e-4
    for flag, expected in (([], calibrated), (["--raw-probs"], raw)):
        out = tmp_path / f"p{len(flag)}.csv"
        result = CliRunner().invoke(cli, ["predict", str(copy), *map(str, files), "--out", str(out),
                                          "--device", "cpu", *flag])
        assert result.exit_code == 0, result.output
        with out.open(newline="") as f:
            got = np.array([[float(r[k]) for k in names] for r in csv.DictReader(f)])
        assert np.allclose(got, expected, atol=1e-5)


def test_evaluate_applies_the_temperature(fitted: tuple[Path, float], tiny_shards: Path, tmp_path: Path) -> None:
    copy, t = fitted
    state = load_checkpoint(copy / "best.pt")
    raw_val = state["val_predictions"]["position_prob"].numpy()  # best.pt's validation: the raw softmax
    names = [f"prob_{p}" for p in state["data"]["positions"]]
    for flag, expected in (([], apply_temperature(raw_val, t)), (["--raw-probs"], raw_val)):
        out = tmp_path / f"eval{len(flag)}"
        result = CliRunner().invoke(cli, ["evaluate", str(copy), str(tiny_shards), "--out", str(out),
                                          "--split", "val", "--device", "cpu", *flag])
        assert result.exit_code == 0, result.output
        with (out / "predictions.csv").open(newline="") as f:
            got = np.array([[float(r[k]) for k in names] for r in csv.DictReader(f)])
        assert np.allclose(got, expected, atol=1e-4)
        record = json.loads((out / "metrics.json").read_text())["calibration"]
        assert record["temperature"] == pytest.approx(1.0 if flag else t)


def test_onnx_export_bakes_the_temperature_in(fitted: tuple[Path, float], tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    copy, t = fitted
    out = tmp_path / "deploy"
    result = CliRunner().invoke(cli, ["export", str(copy), "--out", str(out), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    card = json.loads((out / "model_card.json").read_text())
    assert card["calibration"]["temperature"] == pytest.approx(t) and card["calibration"]["in_graph"]
    state = load_checkpoint(copy / "best.pt")
    model = create_model("resnet_plus_tiny", num_positions=len(state["data"]["positions"]),
                         grade_scale=state["data"]["grade_scale"])
    model.load_state_dict(state["model"])
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.eval()(images)["position"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    probs = session.run(["position_probs"], {"image": images.numpy()})[0]
    assert np.abs(probs - (logits / t).softmax(1).numpy()).max() < 1e-4
    if abs(t - 1) > 1e-3:
        assert np.abs(probs - logits.softmax(1).numpy()).max() > 1e-4


def test_cv_fits_on_out_of_fold_predictions(tmp_path: Path) -> None:
    logits, labels = overconfident(300, 3, 2.0)
    prob = scaled_softmax(logits, 1.0)
    positions = ["a", "b", "c"]
    with (tmp_path / "oof_predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["position_true", *(f"prob_{p}" for p in positions)])
        writer.writerows([positions[y], *row] for y, row in zip(labels, prob, strict=True))
    record, text = cv_calibration(tmp_path, "oof_predictions.csv", positions)
    assert record is not None and record["fitted"] and record["n"] == 300
    assert f"**T = {record['temperature']:.3f}**" in text and "out-of-fold" in text
    assert (tmp_path / "cv_calibration.png").stat().st_size > 0


def test_validation_without_errors_keeps_t_1() -> None:
    # the demo's 72 validation images all right: the NLL falls to T -> 0; sharpening to certainty is no fit
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 200)
    prob = np.full((200, 3), 0.1)
    prob[np.arange(200), labels] = 0.8
    record = calibrate(prob, labels)
    assert record["temperature"] == 1.0 and not record["fitted"] and "every one of the 200" in record["reason"]
