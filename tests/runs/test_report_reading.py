"""report.md as a pathologist reads it: the best epoch (what best.pt holds) and its intervals first, headed
confusion tables, no alarm or advice from a change within the noise the intervals show, "undefined" where a
metric is undefined; curves.png's legend matches its lines, in plain names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cornpipe.models.metrics import compute_metrics
from cornpipe.runs.plots import curves_figure
from cornpipe.runs.report import assess, write_report

NAMES = ["lower", "middle", "upper"]
SCALE = [0.0, 3.0, 5.0, 7.0, 9.0]
CM = [[5, 1, 0], [1, 4, 0], [0, 1, 4]]


def _val(acc: float, loss: float, half: float = 0.1, qwk: float | None = 0.6) -> dict[str, Any]:
    return {"loss": loss, "grade_loss": loss / 2, "position_accuracy": acc, "position_macro_f1": acc - 0.02,
            "grade_mae": 1.0, "grade_qwk": qwk, "n_samples": 16, "confusion": CM,
            "ci": {"position_accuracy": [acc - half, acc + half], "position_macro_f1": [acc - 0.02 - half, acc - 0.02 + half],
                   "grade_mae": [0.8, 1.2]}}


def _records(accs: list[float], train_loss: list[float], val_loss: list[float], best: int,
             qwk: float | None = 0.6) -> list[dict[str, Any]]:
    return [{"epoch": i + 1, "best": i + 1 == best, "train": {"loss": t, "position_accuracy": a},
             "val": _val(a, v, qwk=qwk)} for i, (a, t, v) in enumerate(zip(accs, train_loss, val_loss, strict=True))]


def _write(tmp_path: Path, records: list[dict[str, Any]]) -> str:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "config.json").write_text(json.dumps({"epochs": len(records), "data": {"positions": NAMES}}))
    return write_report(tmp_path).read_text()


def test_report_opens_with_the_best_epoch_and_its_intervals(tmp_path: Path) -> None:
    text = _write(tmp_path, _records([0.70, 0.91, 0.88], [1.0, 0.8, 0.7], [1.0, 0.8, 0.9], best=2))
    opening = "\n".join(text.splitlines()[:4])
    assert "Best epoch 2 of 3 (kept in best.pt)" in opening
    assert "position accuracy 0.910 [0.810, 1.010]" in opening
    assert "position macro-F1 0.890 [0.790, 0.990]" in opening
    assert "grade MAE 1.000 [0.800, 1.200]" in opening


def test_confusion_table_is_headed_rows_true_columns_predicted(tmp_path: Path) -> None:
    lines = _write(tmp_path, _records([0.7, 0.9], [1.0, 0.8], [1.0, 0.8], best=2)).splitlines()
    at = lines.index("| true position \\ predicted | lower | middle | upper | total |")
    assert "Rows = true position, columns = predicted position" in lines[at - 2]
    assert lines[at - 4].startswith("### Position confusion")


def test_no_advice_when_the_change_is_within_noise() -> None:
    # train loss fell, validation loss rose, accuracy moved 0.02 against intervals 0.2 wide: noise
    records = _records([0.80, 0.78], [1.0, 0.5], [1.0, 2.0], best=1)
    notes = " ".join(assess(records, records[0]))
    assert "overfitting" not in notes.lower()
    assert "learning rate" not in notes
    assert "within noise" in notes


def test_advice_when_the_change_is_beyond_noise() -> None:
    records = _records([0.90, 0.60], [1.0, 0.5], [1.0, 2.0], best=1)
    notes = " ".join(assess(records, records[0]))
    assert "Possible overfitting" in notes
    records = _records([0.90, 0.60], [0.5, 1.0], [1.0, 2.0], best=1)
    assert "learning rate may be too high" in " ".join(assess(records, records[0]))


def test_report_change_column_says_within_noise(tmp_path: Path) -> None:
    text = _write(tmp_path, _records([0.80, 0.78], [1.0, 0.5], [0.1, 1.2], best=1))
    row = next(line for line in text.splitlines() if line.startswith("| position accuracy |") and "0.7800" in line)
    assert "within noise" in row and "worse" not in row
    assert "+1000.0%" not in text  # a loss without an interval is not judged


def test_qwk_of_a_constant_true_grade_is_undefined() -> None:
    # every true grade is 5: kappa is 0 by construction, whatever the model predicts
    m = compute_metrics([0, 1, 2, 0], np.eye(3)[[0, 1, 2, 0]], [5.0] * 4, [3.0, 5.0, 7.0, 5.0],
                        grade_scale=SCALE, positions=NAMES, bootstrap=100)
    assert m["grade_qwk"] is None
    assert m["ci"]["grade_qwk"] is None


def test_report_says_undefined_and_why(tmp_path: Path) -> None:
    text = _write(tmp_path, _records([0.7, 0.9], [1.0, 0.8], [1.0, 0.8], best=2, qwk=None))
    assert "grade QWK undefined (one true grade level only)" in "\n".join(text.splitlines()[:4])
    row = next(line for line in text.splitlines() if line.startswith("| grade QWK |"))
    assert "undefined" in row and "0.000" not in row


def test_curves_legend_matches_lines_in_plain_names() -> None:
    records = _records([0.7, 0.9, 0.88], [1.0, 0.8, 0.7], [1.0, 0.8, 0.9], best=2)
    fig = curves_figure(records, best_epoch=2)
    for ax in fig.axes:
        legend = ax.get_legend()
        lines = {line.get_label(): line for line in ax.get_lines()}
        for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
            label = text.get_text()
            assert "_" not in label, label
            if label in lines:  # the legend's handle is drawn as its line is
                assert handle.get_linestyle() == lines[label].get_linestyle(), label
                assert handle.get_color() == lines[label].get_color(), label
    accuracy_panel = fig.axes[1]
    colours = {line.get_label(): line.get_color() for line in accuracy_panel.get_lines()}
    assert colours["validation position accuracy"] != colours["validation position macro-F1"]
    assert any("95 % bootstrap interval" in t.get_text() for t in accuracy_panel.get_legend().get_texts())
