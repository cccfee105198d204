"""Metrics against scikit-learn, the bootstrap, the loss contract, and the run report."""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest
import torch
from rich.console import Console
from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, f1_score, recall_score

from cornpipe.errors import ModelConfigError, ReportError
from cornpipe.models.losses import MultiTaskLoss
from cornpipe.models.metrics import CI_METRICS, compute_metrics, snap_to_scale
from cornpipe.runs.report import format_epoch_table, load_metrics, write_report

SCALE = [0, 3, 5, 7, 9]
NAMES = ["lower", "middle", "upper"]


def _one_hot(pred: list[int], k: int = 3) -> np.ndarray:
    return np.eye(k)[pred] * 0.8 + 0.1


# --- metrics -----------------------------------------------------------------------------------

def test_metrics_match_sklearn_on_known_arrays() -> None:
    pt = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 1])
    pp = np.array([0, 1, 0, 1, 0, 2, 2, 0, 2, 1])
    gt = np.array([0, 3, 5, 7, 9, 0, 3, 9, 5, 7], dtype=np.float32)
    gp = np.array([0.4, 2.0, 5.5, 9.0, 4.0, 1.6, 3.1, 8.0, 7.0, 6.9])
    m = compute_metrics(pt, _one_hot(pp.tolist()), gt, gp, grade_scale=SCALE, positions=NAMES)

    assert m["position_accuracy"] == pytest.approx(accuracy_score(pt, pp))
    assert m["position_macro_f1"] == pytest.approx(f1_score(pt, pp, average="macro"))
    assert m["position_recall"] == pytest.approx(dict(zip(NAMES, recall_score(pt, pp, average=None), strict=True)))
    assert m["confusion"] == confusion_matrix(pt, pp).tolist()
    assert m["grade_mae"] == pytest.approx(np.abs(gp - gt).mean())
    assert m["grade_within_tol"] == pytest.approx(0.9)  # |errors| 0.4 1 .5 2 5 1.6 .1 1 2 .1: all but 5 are <= 2
    snapped = snap_to_scale(gp, SCALE)
    assert snapped.tolist() == [0, 3, 5, 9, 3, 3, 3, 7, 7, 7]  # 4.0 and 8.0 are ties: they go down
    assert m["grade_accuracy"] == pytest.approx(np.mean(snapped == gt))
    ti = [SCALE.index(v) for v in gt]
    pi = [SCALE.index(v) for v in snapped]
    assert m["grade_qwk"] == pytest.approx(cohen_kappa_score(ti, pi, weights="quadratic"))
    assert m["n_samples"] == 10
    json.dumps(m, allow_nan=False)


def test_tolerance_is_inclusive_and_configurable() -> None:
    gt = np.array([0.0, 0.0, 0.0, 0.0])
    gp = np.array([1.0, 2.0, 2.5, 3.0])
    kw = {"grade_scale": SCALE, "positions": NAMES}
    pos = np.zeros(4, dtype=np.int64)
    assert compute_metrics(pos, _one_hot([0] * 4), gt, gp, **kw)["grade_within_tol"] == 0.5
    assert compute_metrics(pos, _one_hot([0] * 4), gt, gp, tolerance=3.0, **kw)["grade_within_tol"] == 1.0


def test_never_predicted_and_unsupported_recall() -> None:
    # "upper" has no true sample and no prediction; "middle" has true samples but is never predicted
    m = compute_metrics([0, 0, 1, 1], _one_hot([0, 0, 0, 0]), [0, 3, 5, 7], [0, 3, 5, 7],
                        grade_scale=SCALE, positions=NAMES)
    assert m["never_predicted"] == ["middle", "upper"]
    assert m["position_recall"] == {"lower": 1.0, "middle": 0.0, "upper": None}
    assert m["position_macro_f1"] == pytest.approx(f1_score([0, 0, 1, 1], [0, 0, 0, 0], labels=[0, 1, 2],
                                                            average="macro", zero_division=0))


def test_qwk_degenerate_case_is_null_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics([0, 1], _one_hot([0, 1]), [5.0, 5.0], [5.2, 4.9], grade_scale=SCALE,
                            positions=NAMES, bootstrap=200)
    assert m["grade_qwk"] is None
    assert m["ci"]["grade_qwk"] is None
    json.dumps(m, allow_nan=False)


def test_qwk_counts_levels_absent_from_the_split() -> None:
    """Kept on purpose (README, report.md): the distances are those of the full declared scale."""
    true, pred = [0.0, 3.0, 3.0, 9.0, 9.0, 0.0], [0.0, 3.0, 9.0, 9.0, 3.0, 3.0]  # no 5s or 7s anywhere
    m = compute_metrics([0] * 6, _one_hot([0] * 6), true, pred, grade_scale=SCALE, positions=NAMES)
    idx = {g: i for i, g in enumerate(SCALE)}
    ti, pi = [idx[g] for g in true], [idx[g] for g in pred]
    assert m["grade_qwk"] == pytest.approx(cohen_kappa_score(ti, pi, labels=range(len(SCALE)), weights="quadratic"))
    assert m["grade_qwk"] != pytest.approx(cohen_kappa_score(ti, pi, weights="quadratic"))  # sklearn's default


def test_bad_inputs_raise() -> None:
    kw = {"grade_scale": SCALE, "positions": NAMES}
    with pytest.raises(ValueError, match="shape"):
        compute_metrics([0, 1], np.zeros((2, 2)), [0, 3], [0, 3], **kw)
    with pytest.raises(ValueError, match="non-finite"):
        compute_metrics([0, 1], _one_hot([0, 1]), [0, 3], [np.nan, 3], **kw)
    with pytest.raises(ModelConfigError, match="ascending"):
        compute_metrics([0, 1], _one_hot([0, 1]), [0, 3], [0, 3], grade_scale=[0, 5, 3], positions=NAMES)


def test_bootstrap_ci_matches_sklearn_resamples_and_is_fast() -> None:
    rng = np.random.default_rng(1)
    n = 1000
    pt = rng.integers(0, 3, n)
    pp = np.where(rng.random(n) < 0.7, pt, rng.integers(0, 3, n))
    gt = rng.choice(SCALE, n).astype(np.float64)
    gp = np.clip(gt + rng.normal(0, 1.5, n), 0, 9)
    start = time.perf_counter()
    m = compute_metrics(pt, _one_hot(pp.tolist()), gt, gp, grade_scale=SCALE, positions=NAMES,
                        bootstrap=1000, seed=3)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"bootstrap of 1000 x 1000 took {elapsed:.2f} s"
    assert set(m["ci"]) == set(CI_METRICS)
    for key, (lo, hi) in m["ci"].items():
        assert lo <= m[key] <= hi, key
    # deterministic in the seed
    again = compute_metrics(pt, _one_hot(pp.tolist()), gt, gp, grade_scale=SCALE, positions=NAMES,
                            bootstrap=1000, seed=3)
    assert again["ci"] == m["ci"]

    # the vectorised F1 / QWK arithmetic equals sklearn on the same resamples: rebuild the
    # percentile interval from sklearn calls on a small problem
    small = slice(0, 16)
    ms = compute_metrics(pt[small], _one_hot(pp[small].tolist()), gt[small], gp[small], grade_scale=SCALE,
                         positions=NAMES, bootstrap=50, seed=7)
    idx = np.random.default_rng(7).integers(0, 16, size=(50, 16))
    f1s = [f1_score(pt[small][i], pp[small][i], labels=[0, 1, 2], average="macro", zero_division=0) for i in idx]
    assert ms["ci"]["position_macro_f1"] == pytest.approx(np.percentile(f1s, [2.5, 97.5]).tolist())
    ti, pi = (np.abs(np.asarray(v)[:, None] - np.array(SCALE)).argmin(1) for v in (gt[small], gp[small]))
    kappas = []
    for i in idx:
        if len(set(ti[i]) | set(pi[i])) > 1:
            kappas.append(cohen_kappa_score(ti[i], pi[i], labels=range(5), weights="quadratic"))
    assert ms["ci"]["grade_qwk"] == pytest.approx(np.percentile(kappas, [2.5, 97.5]).tolist())


# --- loss --------------------------------------------------------------------------------------

def _outputs(b: int = 4, p: int = 3) -> dict[str, torch.Tensor]:
    return {"position": torch.randn(b, p), "grade": torch.rand(b) * 9}


def test_loss_rejects_any_shape_or_dtype_mismatch() -> None:
    loss = MultiTaskLoss(grade_scale=SCALE)
    out = _outputs()
    pos, grade = torch.tensor([0, 1, 2, 0]), torch.tensor([0.0, 3.0, 5.0, 9.0])
    loss(out, pos, grade)  # the valid call works
    with pytest.raises(ValueError, match="grade target shape"):
        loss(out, pos, grade[:, None])  # (B, 1) would broadcast to (B, B)
    with pytest.raises(ValueError, match="grade target shape"):
        loss(out, pos, grade[:3])
    with pytest.raises(ValueError, match="position target shape"):
        loss(out, pos[:, None], grade)
    with pytest.raises(ValueError, match="int64"):
        loss(out, pos.int(), grade)
    with pytest.raises(ValueError, match="grade output shape"):
        loss({"position": out["position"], "grade": out["grade"][:, None]}, pos, grade)


def test_loss_weights_and_scale_normalisation() -> None:
    out = {"position": torch.tensor([[2.0, 0.0, 0.0]]), "grade": torch.tensor([4.5])}
    pos, grade = torch.tensor([0]), torch.tensor([9.0])
    total, parts = MultiTaskLoss(weights=(0.7, 0.3), grade_scale=SCALE)(out, pos, grade)
    assert total.item() == pytest.approx(0.7 * parts["position"].item() + 0.3 * parts["grade"].item())
    assert parts["position"].item() == pytest.approx(torch.nn.functional.cross_entropy(out["position"], pos).item())
    # the same relative error (half the scale) costs the same on 0-9 and 0-25
    out25 = {"position": out["position"], "grade": torch.tensor([12.5])}
    _, parts25 = MultiTaskLoss(grade_scale=list(range(26)))(out25, pos, torch.tensor([25.0]))
    assert parts25["grade"].item() == pytest.approx(parts["grade"].item())
    with pytest.raises(ModelConfigError):
        MultiTaskLoss(weights=(0.7,), grade_scale=SCALE)


def test_corn_loss_needs_grades_on_the_scale() -> None:
    loss = MultiTaskLoss(grade_scale=SCALE, grade_head="corn")
    out = {**_outputs(2), "grade_logits": torch.zeros(2, 4)}
    total, _ = loss(out, torch.tensor([0, 1]), torch.tensor([3.0, 9.0]))
    assert torch.isfinite(total)
    with pytest.raises(ValueError, match="not on the grade scale"):
        loss(out, torch.tensor([0, 1]), torch.tensor([4.0, 9.0]))


# --- report ------------------------------------------------------------------------------------

def _split(loss: float, acc: float, f1: float, mae: float, confusion: list[list[int]], ci: bool) -> dict:
    cm = np.array(confusion)
    split = {
        "loss": loss, "position_loss": loss * 1.2, "grade_loss": loss * 0.5,
        "position_accuracy": acc, "position_macro_f1": f1,
        "position_recall": {n: float(cm[i, i] / cm[i].sum()) for i, n in enumerate(NAMES)},
        "confusion": confusion, "never_predicted": [n for i, n in enumerate(NAMES) if cm[:, i].sum() == 0],
        "grade_mae": mae, "grade_within_tol": 0.75, "grade_accuracy": 0.5, "grade_qwk": 0.6,
        "images_per_s": 250.0, "data_wait_share": 0.1, "n_samples": int(cm.sum()),
    }
    if ci:
        split["ci"] = {"position_accuracy": [acc - 0.2, min(acc + 0.2, 1.0)], "grade_mae": [mae - 0.4, mae + 0.4]}
    return split


@pytest.fixture
def run_dir(tmp_path):
    cm_good = [[5, 1, 0], [1, 4, 0], [0, 1, 4]]
    cm_blind = [[5, 1, 0], [1, 4, 0], [2, 3, 0]]  # "upper" never predicted
    records = [
        {"epoch": 1, "lr": 1e-3, "time_s": 3.0, "train": _split(1.00, 0.50, 0.45, 2.0, cm_good, False),
         "val": _split(0.90, 0.55, 0.50, 1.8, cm_good, True), "monitor": 0.30, "best": True},
        {"epoch": 2, "lr": 1e-3, "time_s": 3.0, "train": _split(0.80, 0.60, 0.55, 1.5, cm_good, False),
         "val": _split(0.80, 0.80, 0.78, 1.2, cm_good, True), "monitor": 0.65, "best": True},
        {"epoch": 3, "lr": 5e-4, "time_s": 3.0, "train": _split(0.60, 0.70, 0.65, 1.2, cm_good, False),
         "val": _split(1.00, 0.60, 0.40, 1.5, cm_blind, True), "monitor": 0.25, "best": False},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "config.json").write_text(json.dumps({"model": "resnet_plus_tiny", "epochs": 3, "tolerance": 2.0}))
    return tmp_path


def test_report_files_tables_and_assessment(run_dir) -> None:
    path = write_report(run_dir)
    assert path == run_dir / "report.md"
    for png in ("curves.png", "confusion_matrix.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = path.read_text()
    # latest epoch against the one before, validation changes judged against the interval's half-width
    assert "| total loss | 0.6000 | 1.0000 | — | 0.8000 | not judged (no interval) |" in text
    assert "| position accuracy | 0.7000 | 0.6000 | [0.400, 0.800] | 0.8000 | within noise (±0.200) |" in text
    assert "| grade MAE | 1.2000 | 1.5000 | [1.100, 1.900] | 1.2000 | within noise (±0.400) |" in text
    # per-class recall: upper went from 0.8 to 0
    assert "| upper | 0.8000 | 0.0000 | 0.8000 |" in text
    assert "| **upper** | 2 | 3 | 0 | 5 |" in text  # confusion row, last epoch
    assert "WARNING: position class(es) `upper` never predicted on validation in epoch 3" in text
    assert "Grade QWK weighs disagreements on the full declared grade scale" in text
    assert "Changes since epoch 2 are within noise" in text and "overfitting" not in text
    assert "Validation set too small to tell (16 images)" in text
    assert "## Best epoch: 2 (marked best by the trainer, monitor 0.6500; kept in best.pt)" in text
    assert "Run: model `resnet_plus_tiny`, epochs `3`" in text


def test_report_survives_a_torn_last_line_and_resumed_epochs(run_dir) -> None:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    # resume rewrote epoch 3, and a kill left half a line behind
    (run_dir / "metrics.jsonl").write_text("\n".join(lines + [lines[2].replace('"lr": 0.0005', '"lr": 0.0001')])
                                           + "\n" + lines[0][:40])
    records = load_metrics(run_dir)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["lr"] == 1e-4
    assert "lr 0.0001" in write_report(run_dir).read_text()


def test_report_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(ReportError, match="no metrics.jsonl in"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(ReportError, match="line 2 is not an epoch record") as info:
        write_report(tmp_path)
    assert "\n" not in str(info.value)


def test_epoch_table_previous_and_change(run_dir) -> None:
    records = load_metrics(run_dir)
    table = format_epoch_table(records[2], records[1])
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    row = next(line for line in text.splitlines() if "position accuracy" in line)
    assert "0.7000" in row and "0.6000" in row and "0.8000" in row and "-25.0% (worse)" in row
    assert "never predicted on validation: upper" in text
    first = Console(width=200, record=True)
    first.print(format_epoch_table(records[0]))
    assert "n/a" in first.export_text()
