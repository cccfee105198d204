"""`cornpipe audit`: confident learning over held-out predictions ranks planted label flips first."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_run, error_line

pytest.importorskip("cleanlab")

PLANTED = (4, 17, 30)  # manifest sample ids whose given label the test flips


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _prediction_rows(shards: Path, seeds: tuple[int | None, ...], split: str | None = None) -> list[dict]:
    """Held-out predictions that know each sample's true position (0.6-0.9 on it); the given label of the
    PLANTED samples is flipped to the next class, as a mislabelled photo would be."""
    manifest = json.loads((shards / "manifest.json").read_text())
    positions = manifest["positions"]
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(seed or 0)
        for s in manifest["samples"]:
            if split is not None and s["split"] != split:
                continue
            true = int(s["position"])
            given = (true + 1) % len(positions) if s["id"] in PLANTED else true
            probs = np.full(len(positions), 0.0)
            probs[true] = 0.92 if s["id"] in PLANTED else rng.uniform(0.6, 0.9)  # a model sure of the truth
            probs[[k for k in range(len(positions)) if k != true]] = (1 - probs[true]) / (len(positions) - 1)
            rows.append({**({"seed": seed, "fold": s["id"] % 3} if seed is not None else {}),
                         "sample_id": s["id"], "path": s["path"], "source": s["source"],
                         "position_true": positions[given], "position_pred": positions[true],
                         **{f"prob_{p}": f"{v:.6f}" for p, v in zip(positions, probs, strict=True)},
                         "grade_true": s["grade"], "grade_pred": s["grade"]})
    return rows


def _cv_folder(tmp_path: Path, shards: Path, seeds: tuple[int, ...] = (0, 1), named: Path | None = None) -> Path:
    """A cv folder as `cornpipe cv` leaves it (marker naming the shard set, or `named`; oof_predictions.csv)."""
    cv = tmp_path / "cv"
    cv.mkdir()
    (cv / ".cornpipe-cv").write_text(json.dumps({"cv_id": "x", "config": {"shards": str(named or shards)}}))
    _write(cv / "oof_predictions.csv", _prediction_rows(shards, seeds))
    return cv


def _issues(out: Path) -> tuple[list[str], list[dict]]:
    with (out / "label_issues.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_planted_flips_rank_first_with_their_manifest_paths(tiny_shards: Path, tmp_path: Path) -> None:
    cv = _cv_folder(tmp_path, tiny_shards)
    result = cli_run("audit", cv, "--out", tmp_path / "audit")
    assert result.exit_code == 0, result.output
    assert "of 54 samples flagged" in result.output and "2 seeds averaged" in result.output
    columns, rows = _issues(tmp_path / "audit")
    assert columns == ["path", "source", "given", "suggested", "score"]
    manifest = {s["path"]: s for s in json.loads((tiny_shards / "manifest.json").read_text())["samples"]}
    positions = json.loads((tiny_shards / "manifest.json").read_text())["positions"]
    top = rows[:len(PLANTED)]
    assert sorted(manifest[r["path"]]["id"] for r in top) == sorted(PLANTED)
    for r in top:  # suggested = the true position; given = the flipped one
        assert r["suggested"] == positions[manifest[r["path"]]["position"]] != r["given"]
        assert r["source"] == manifest[r["path"]]["source"]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores)  # most suspect (lowest label quality) first
    assert (tmp_path / "audit" / "suspects.png").stat().st_size > 1000


def test_a_run_folder_is_audited_and_said_to_be_partial(tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "survey-shards").symlink_to(tiny_shards)
    # config.json keeps the path as typed where training ran (here: the folder above the run)
    (run / "config.json").write_text(json.dumps({"shards": "survey-shards"}))
    _write(run / "val_predictions.csv", _prediction_rows(tiny_shards, (None,), split="val"))
    result = cli_run("audit", run, "--out", tmp_path / "audit")
    assert result.exit_code == 0, result.output
    assert "saw only part of the data" in result.output and "of 54 samples" in result.output
    assert (tmp_path / "audit" / "suspects.png").is_file()  # thumbnails found through the relative path
    columns, rows = _issues(tmp_path / "audit")
    assert columns == ["path", "source", "given", "suggested", "score"]
    val = {s["path"] for s in json.loads((tiny_shards / "manifest.json").read_text())["samples"]
           if s["split"] == "val" and s["id"] in PLANTED}
    assert val and {r["path"] for r in rows[:len(val)]} == val


def test_bad_folders_are_one_error_line(tiny_shards: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "neither a cv folder" in error_line(cli_run("audit", empty, "--out", tmp_path / "a"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"shards": str(tiny_shards)}))
    assert "without val_predictions.csv" in error_line(cli_run("audit", run, "--out", tmp_path / "a"))
    cv = _cv_folder(tmp_path, tiny_shards, seeds=(0,))
    rows = list(csv.DictReader((cv / "oof_predictions.csv").open()))
    _write(cv / "oof_predictions.csv", [*rows, rows[5]])  # sample 5 held out by two folds of seed 0
    line = error_line(cli_run("audit", cv, "--out", tmp_path / "a"))
    assert "sample 5 is held out twice within seed 0" in line and "overlap" in line
    assert not (tmp_path / "a" / "label_issues.csv").exists()


def test_without_cleanlab_the_error_names_the_extra(tiny_shards: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # import cleanlab raises ImportError
    line = error_line(cli_run("audit", _cv_folder(tmp_path, tiny_shards), "--out", tmp_path / "a"))
    assert "cleanlab" in line and "cornpipe[audit]" in line


def test_classes_too_small_to_judge_are_named_not_warned_about() -> None:
    from cornpipe.runs.audit import rank_issues

    ranked, scores, few = rank_issues([0, 1, 2], [[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.3, 0.2, 0.5]])
    assert few == [0, 1, 2] and len(scores) == 3


def test_a_moved_shard_set_still_gives_the_csv_and_says_why_no_sheet(tiny_shards: Path, tmp_path: Path) -> None:
    cv = _cv_folder(tmp_path, tiny_shards, named=tmp_path / "moved-away")  # a shard set no longer there
    result = cli_run("audit", cv, "--out", tmp_path / "audit")
    assert result.exit_code == 0, result.output
    assert "no suspects.png" in result.output and not (tmp_path / "audit" / "suspects.png").exists()
    _, rows = _issues(tmp_path / "audit")
    manifest = {s["id"]: s["path"] for s in json.loads((tiny_shards / "manifest.json").read_text())["samples"]}
    assert {r["path"] for r in rows[:len(PLANTED)]} == {manifest[i] for i in PLANTED}  # from the predictions file
