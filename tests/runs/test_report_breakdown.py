"""Where the model fails, in report.md and cv.md: metrics per source folder and stage (from the run's
per-sample predictions joined with the manifest) and a grade confusion matrix beside the position one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cornpipe.runs.breakdown import breakdown, breakdown_section, join_manifest
from cornpipe.runs.report import write_report

NAMES = ["lower", "middle", "upper"]
SCALE = [0.0, 3.0, 5.0, 7.0, 9.0]
SOURCES = {"9l": 12, "9m": 4, "14u": 20}  # 9m: too few for an interval


def _prediction_rows(sources: dict[str, int], seed: int = 0) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    rows, sample_id = [], 0
    for source, n in sources.items():
        true = {"l": "lower", "m": "middle", "u": "upper"}[source[-1]]
        for _ in range(n):
            pred = true if rng.random() < 0.8 else NAMES[rng.integers(0, 3)]
            grade = float(rng.choice(SCALE))
            rows.append({"sample_id": str(sample_id), "path": f"{source}/{sample_id}.jpg", "source": source,
                         "stage": source[:-1], "split": "val", "position_true": true, "position_pred": pred,
                         **{f"prob_{p}": str(float(p == pred)) for p in NAMES}, "grade_true": str(grade),
                         "grade_pred": str(grade + rng.normal(0, 1.0)), "grade_pred_level": "0"})
            sample_id += 1
    return rows


def make_run(tmp_path: Path, rows: list[dict[str, str]]) -> Path:
    """A finished run's files: two epochs in metrics.jsonl, config.json and val_predictions.csv."""
    split = {"loss": 1.0, "position_accuracy": 0.8, "position_macro_f1": 0.78, "grade_mae": 1.0,
             "grade_qwk": 0.5, "n_samples": len(rows), "confusion": [[5, 1, 0], [1, 4, 0], [0, 1, 4]],
             "ci": {"position_accuracy": [0.7, 0.9], "position_macro_f1": [0.68, 0.88], "grade_mae": [0.8, 1.2]}}
    records = [{"epoch": 1, "train": split, "val": split, "best": True},
               {"epoch": 2, "train": split, "val": split, "best": False}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "config.json").write_text(json.dumps({"epochs": 2, "data": {"positions": NAMES, "grade_scale": SCALE}}))
    with (tmp_path / "val_predictions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path


def test_breakdown_per_source_gives_n_and_intervals_only_where_n_allows() -> None:
    groups = {g["value"]: g for g in breakdown(_prediction_rows(SOURCES), "source")}
    assert list(groups) == ["9l", "9m", "14u"]  # survey order, not text order
    assert {v: g["n"] for v, g in groups.items()} == SOURCES
    assert groups["9m"]["ci"] is None
    lo, hi = groups["14u"]["ci"]["accuracy"]
    assert lo <= groups["14u"]["accuracy"] <= hi
    # a source folder holds one position: its macro-F1 is that position's F1, not a third of it
    rows = [r for r in _prediction_rows(SOURCES) if r["source"] == "9l"]
    assert groups["9l"]["macro_f1"] == pytest.approx(
        2 * sum(r["position_pred"] == "lower" for r in rows)
        / (len(rows) + sum(r["position_pred"] == "lower" for r in rows)))


def test_report_has_a_row_per_source_and_stage_with_n(tmp_path: Path) -> None:
    text = write_report(make_run(tmp_path, _prediction_rows(SOURCES))).read_text()
    lines = text.splitlines()
    for source, n in SOURCES.items():
        row = next(line for line in lines if line.startswith(f"| {source} |"))
        assert f"| {source} | {n} |" in row
        assert ("too few to give an interval" in row) == (n < 10)
    assert "### By stage" in text
    assert next(line for line in lines if line.startswith("| 9 |")).startswith("| 9 | 16 |")


def test_grade_confusion_matrix_png_and_headed_table(tmp_path: Path) -> None:
    run = make_run(tmp_path, _prediction_rows(SOURCES))
    text = write_report(run).read_text()
    assert (run / "grade_confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Rows = true grade, columns = predicted grade" in text
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| true grade \\ predicted"))
    assert lines[at] == "| true grade \\ predicted | 0 | 3 | 5 | 7 | 9 | total |"
    totals = [int(line.split("|")[-2]) for line in lines[at + 2:at + 7]]
    assert sum(totals) == sum(SOURCES.values())  # every validated image once


def test_a_key_whose_every_value_is_unknown_gets_one_line() -> None:
    rows = [{**r, "source": ""} for r in _prediction_rows(SOURCES)]
    lines = breakdown_section(rows, ["source", "stage"])
    assert sum("source" in line and "unknown" in line for line in lines) == 1
    assert "### By source" not in lines and "### By stage" in lines


def test_manifest_metadata_joins_on_sample_id(tmp_path: Path) -> None:
    rows = _prediction_rows({"9l": 3})
    samples = [{"id": int(r["sample_id"]), "origin": "field" if i else "lab"} for i, r in enumerate(rows)]
    (tmp_path / "manifest.json").write_text(json.dumps({"samples": samples}))
    joined = join_manifest(rows, tmp_path)
    assert [g["value"] for g in breakdown(joined, "origin")] == ["field", "lab"]
    assert [g["n"] for g in breakdown(joined, "origin")] == [2, 1]


def test_cv_md_breaks_the_out_of_fold_predictions_down_by_source(tmp_path: Path) -> None:
    from test_cv import fake_cv_dir

    from cornpipe.runs.cv import write_summary

    n, folds, seeds = 30, 3, [0, 1]
    fake_cv_dir(tmp_path, n, folds, seeds)
    for path in tmp_path.glob("*/val_predictions.csv"):  # two sources: even ids 9l, odd ids 14m
        rows = list(csv.DictReader(path.open(newline="")))
        for row in rows:
            row["source"] = "9l" if int(row["sample_id"]) % 2 == 0 else "14m"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    write_summary(tmp_path, [(f, s) for f in range(folds) for s in seeds])
    md = (tmp_path / "cv.md").read_text()
    assert "| 9l | 15 |" in md and "| 14m | 15 |" in md  # every sample once: one seed, not both
    assert "| true grade \\ predicted |" in md
    assert (tmp_path / "cv_grade_confusion.png").stat().st_size > 0


def test_a_trained_run_reports_every_validated_source(tiny_shards: Path, tmp_path: Path) -> None:
    """train writes val_predictions.csv before the report reads it: the breakdown is there on the first write."""
    from collections import Counter

    from cornpipe.runs.config import TrainConfig
    from cornpipe.train import train

    run = tmp_path / "run"
    train(TrainConfig(shards=str(tiny_shards), out=str(run), model="resnet_plus_tiny", image_size=32,
                      batch_size=16, epochs=1, workers=0, device="cpu", bootstrap=50, loader="torch"))
    counts = Counter(r["source"] for r in csv.DictReader((run / "val_predictions.csv").open(newline="")))
    text = (run / "report.md").read_text()
    for source, n in counts.items():
        assert f"| {source} | {n} |" in text
    assert (run / "grade_confusion.png").is_file()


def test_a_manifest_column_of_a_few_values_is_broken_down_without_asking(tmp_path: Path) -> None:
    """origin (field/lab) is shown though nobody asked; field_id, one value per image, is not."""
    rows = _prediction_rows(SOURCES)
    run = make_run(tmp_path, rows)
    samples = [{"id": int(r["sample_id"]), "source": r["source"],
                "meta": {"origin": "field" if i % 6 == 0 else "lab", "field_id": f"f{i}"}} for i, r in enumerate(rows)]
    (run / "manifest.json").write_text(json.dumps({"samples": samples}))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "shards": str(run)}))
    text = write_report(run).read_text()
    assert "## Breakdown by source, stage and origin" in text and "### By field_id" not in text
    field = sum(s["meta"]["origin"] == "field" for s in samples)
    assert f"| field | {field} |" in text and f"| lab | {len(rows) - field} |" in text
    (run / "config.json").write_text(json.dumps({**config, "shards": str(run), "oversample_by": "position,field_id"}))
    assert "### By field_id" in write_report(run).read_text()  # the key the draw balanced: shown whatever its size
