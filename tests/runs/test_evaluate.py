"""`cornpipe evaluate MODEL SHARDS --out DIR`: a run's own val split gives its logged validation metrics;
a shard set the model cannot score is one Error line."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_run

from cornpipe.runs.report import load_metrics

METRIC_KEYS = ("position_accuracy", "position_macro_f1", "grade_mae", "grade_within_tol", "grade_qwk",
               "position_recall")


@pytest.fixture(scope="module")
def run(trained_run: Path) -> Path:
    return trained_run


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_val_split_gives_the_runs_own_val_metrics(run: Path, tiny_shards: Path, tmp_path: Path) -> None:
    result = cli_run("evaluate", run, tiny_shards, "--split", "val", "--out", tmp_path / "ev", "--device", "cpu",
                     "--batch-size", "5")
    assert result.exit_code == 0, result.output
    logged = next(r for r in load_metrics(run) if r.get("best"))["val"]
    got = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert got["split"] == "val"
    for key in METRIC_KEYS:
        assert got["metrics"][key] == pytest.approx(logged[key], rel=1e-5), key
    assert got["metrics"]["confusion"] == logged["confusion"]
    assert got["metrics"]["n_samples"] == logged["n_samples"]
    ci = got["metrics"]["ci"]  # the bootstrap intervals the run drew (bootstrap=50, same seed)
    assert ci and set(ci) == set(logged["ci"])
    for key, interval in ci.items():
        assert interval == pytest.approx(logged["ci"][key], rel=1e-5, abs=1e-6), key
    # predictions.csv is val_predictions.csv, row for row (another batch size: floats to float32 rounding)
    mine, theirs = read_csv(tmp_path / "ev" / "predictions.csv"), read_csv(run / "val_predictions.csv")
    assert [list(r) for r in mine] == [list(r) for r in theirs]
    for a, b in zip(mine, theirs, strict=True):
        floats = [k for k in a if k.startswith("prob_") or k == "grade_pred"]
        assert {k: v for k, v in a.items() if k not in floats} == {k: v for k, v in b.items() if k not in floats}
        assert [float(a[k]) for k in floats] == pytest.approx([float(b[k]) for k in floats], abs=1e-5)
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "Position confusion matrix" in report and (tmp_path / "ev" / "confusion_matrix.png").is_file()


def test_every_sample_by_default_from_a_checkpoint(run: Path, tiny_shards: Path, tmp_path: Path) -> None:
    result = cli_run("evaluate", run / "best.pt", tiny_shards, "--out", tmp_path / "ev", "--device", "cpu")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    rows = read_csv(tmp_path / "ev" / "predictions.csv")
    assert sorted(int(r["sample_id"]) for r in rows) == sorted(s["id"] for s in manifest["samples"])
    assert {r["split"] for r in rows} == {"train", "val"}
    got = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert got["split"] == "all" and got["metrics"]["n_samples"] == len(rows)


def test_train_split(run: Path, tiny_shards: Path, tmp_path: Path) -> None:
    result = cli_run("evaluate", run, tiny_shards, "--split", "train", "--out", tmp_path / "ev", "--device", "cpu",
                     "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "ev" / "predictions.csv")
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert len(rows) == manifest["splits"]["train"]["count"] and {r["split"] for r in rows} == {"train"}
    got = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert got["bootstrap"] == 0 and not got["metrics"].get("ci")


@pytest.mark.parametrize("change, words", [
    ({"positions": ["lower", "middle", "top"]}, "has position classes lower,middle,top, the model"),
    ({"grade_scale": [0.0, 1.0, 2.0, 3.0, 4.0]}, "has grade scale 0,1,2,3,4, the model"),
])
def test_a_shard_set_with_other_classes_or_scale_is_one_error_line(run: Path, tiny_shards: Path, tmp_path: Path,
                                                                    change: dict, words: str) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, **change}))
    result = cli_run("evaluate", run, other, "--out", tmp_path / "ev", "--device", "cpu")
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and words in result.output
    assert result.output.startswith(f"Error: {other} ")
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("which", ["run", "shards", "inside shards"])
def test_out_that_is_an_input_is_refused(run: Path, tiny_shards: Path, which: str) -> None:
    out = {"run": run, "shards": tiny_shards, "inside shards": tiny_shards / "eval"}[which]
    before = (run / "report.md").read_text()
    result = cli_run("evaluate", run, tiny_shards, "--out", out, "--device", "cpu")
    assert result.exit_code == 1 and result.output.startswith(f"Error: --out {out} is an input")
    assert (run / "report.md").read_text() == before and not (tiny_shards / "eval").exists()


class _LeftRight(torch.nn.Module):
    """Logits (mean of the left half, mean of the right half, 0) and grade left - right: its mirror swaps
    the first two classes and negates the grade, so the mirror average is symmetric."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        half = x.shape[3] // 2
        left, right = x[..., :half].mean((1, 2, 3)), x[..., half:].mean((1, 2, 3))
        return {"position": torch.stack([left, right, torch.zeros_like(left)], 1), "grade": left - right}


def test_tta_averages_the_probabilities_of_the_image_and_its_mirror() -> None:
    from rich.progress import Progress

    from cornpipe.loaders.base import Batch
    from cornpipe.models.losses import MultiTaskLoss
    from cornpipe.runs.config import TrainConfig
    from cornpipe.runs.evaluation import evaluate

    gen = torch.Generator().manual_seed(0)
    batch = Batch(torch.rand(6, 3, 8, 8, generator=gen) * 4, torch.tensor([0, 1, 2, 0, 1, 2]),
                  torch.full((6,), 5.0), torch.arange(6))
    loss = MultiTaskLoss(grade_scale=[0.0, 3.0, 5.0, 7.0, 9.0])
    cfg = TrainConfig(device="cpu", amp="off")
    results = {}
    for tta in (False, True):
        with Progress(disable=True) as progress:
            results[tta] = evaluate(_LeftRight(), [batch], loss, cfg, steps=1, progress=progress,
                                    task=progress.add_task("eval", total=1, ips=0.0), tta=tta)
    plain = torch.from_numpy(results[False]["position_prob"])
    logits = _LeftRight()(batch.images)["position"]
    mirrored = _LeftRight()(batch.images.flip(3))["position"]
    assert not torch.allclose(plain[:, 0], plain[:, 1])  # the test can tell
    expected = (logits.softmax(1) + mirrored.softmax(1)) / 2
    assert results[True]["position_prob"] == pytest.approx(expected.numpy(), abs=1e-6)
    assert results[True]["grade_pred"] == pytest.approx(np.zeros(6), abs=1e-6)


def test_evaluate_tta_on_the_command_line_is_recorded(run: Path, tiny_shards: Path, tmp_path: Path) -> None:
    result = cli_run("evaluate", run, tiny_shards, "--split", "val", "--out", tmp_path / "ev", "--device", "cpu",
                     "--tta")
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert got["tta"] is True
    assert "mirror" in (tmp_path / "ev" / "report.md").read_text()
