"""`cornpipe predict`: same numbers as validation for the same image; bad files are listed, not fatal."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cornpipe.cli import cli
from cornpipe.loaders import make_loader
from cornpipe.loaders.base import IMAGENET
from cornpipe.models import create_model
from cornpipe.runs.checkpoint import load_checkpoint
from cornpipe.shards.shard_set import ShardSet

POSITIONS = ["lower", "middle", "upper"]
SCALE = [0.0, 3.0, 5.0, 7.0, 9.0]


@pytest.fixture(scope="module")
def checkpoint(trained_run: Path) -> Path:
    return trained_run / "best.pt"


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_predictions_equal_validation_outputs(checkpoint: Path, tiny_shards: Path, synth_raw: Path,
                                              tmp_path: Path) -> None:
    """The original image through predict gives what the validation loader gave the model."""
    shards = ShardSet(tiny_shards)
    samples = shards.samples("val")
    state = load_checkpoint(checkpoint)
    model = create_model("resnet_plus_tiny", num_positions=3, grade_scale=SCALE)
    model.load_state_dict(state["model"])
    model.eval()
    expected = {}
    loader = make_loader(shards, "val", backend="torch", batch_size=8, image_size=32, workers=0, oversample="none",
                         normalization=IMAGENET)
    with torch.no_grad():
        for batch in loader:
            out = model(batch.images)
            for sid, prob, grade in zip(batch.sample_id.tolist(), out["position"].softmax(1), out["grade"],
                                        strict=True):
                expected[sid] = (prob, float(grade))
    by_path = {str(synth_raw / s["path"]): s["id"] for s in samples}

    out_csv = tmp_path / "preds.csv"
    result = CliRunner().invoke(cli, ["predict", str(checkpoint), *by_path, "--out", str(out_csv),
                                      "--device", "cpu", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    rows = read_csv(out_csv)
    assert list(rows[0]) == ["path", "position_pred", "prob_lower", "prob_middle", "prob_upper", "grade_pred",
                            "grade_pred_level", "error"]
    assert [r["path"] for r in rows] == list(by_path)
    for row in rows:
        prob, grade = expected[by_path[row["path"]]]
        got = torch.tensor([float(row[f"prob_{name}"]) for name in POSITIONS])
        assert torch.allclose(got, prob, atol=2e-5), (row, prob)
        assert row["position_pred"] == POSITIONS[int(prob.argmax())]
        assert abs(float(row["grade_pred"]) - grade) < 2e-4
        assert float(row["grade_pred_level"]) == min(SCALE, key=lambda g: abs(g - grade))
        assert row["error"] == ""


def test_unreadable_files_are_listed_not_fatal(checkpoint: Path, synth_raw: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "field2").mkdir(parents=True)
    images = sorted(synth_raw.rglob("*.jpg"))[:3]
    shutil.copy(images[0], folder / "a.jpg")
    shutil.copy(images[1], folder / "field2" / "b.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (folder / "notes.txt").write_text("not an image, not listed")
    out_csv = tmp_path / "preds.csv"
    result = CliRunner().invoke(cli, ["predict", str(checkpoint), str(folder), str(images[2]),
                                      "--out", str(out_csv), "--tta", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "predicted 3 image(s), 1 unreadable" in result.output
    rows = {Path(r["path"]).name: r for r in read_csv(out_csv)}
    assert set(rows) == {"a.jpg", "b.jpg", "broken.jpg", images[2].name}
    broken = rows.pop("broken.jpg")
    assert broken["error"] and broken["position_pred"] == "" and broken["grade_pred_level"] == ""
    assert broken["prob_lower"] == ""
    for row in rows.values():
        assert row["error"] == "" and row["position_pred"] in POSITIONS
        assert abs(sum(float(row[f"prob_{n}"]) for n in POSITIONS) - 1.0) < 1e-4
        assert float(row["grade_pred_level"]) in SCALE and 0.0 <= float(row["grade_pred"]) <= 9.0


def test_predict_errors(checkpoint: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    (tmp_path / "x.jpg").write_bytes(b"nope")
    missing = runner.invoke(cli, ["predict", str(tmp_path / "none.pt"), str(tmp_path / "x.jpg"),
                                  "--out", str(tmp_path / "p.csv")])
    assert missing.exit_code == 1
    assert missing.output.strip() == f"Error: checkpoint not found: {tmp_path / 'none.pt'}"

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    junk = runner.invoke(cli, ["predict", str(tmp_path / "junk.pt"), str(tmp_path / "x.jpg"),
                               "--out", str(tmp_path / "p.csv")])
    assert junk.exit_code == 1 and junk.output.startswith(f"Error: cannot read checkpoint {tmp_path / 'junk.pt'}")

    none_read = runner.invoke(cli, ["predict", str(checkpoint), str(tmp_path / "x.jpg"), "--out",
                                    str(tmp_path / "p.csv"), "--device", "cpu"])
    assert none_read.exit_code == 1
    assert none_read.output.strip().splitlines()[-1] == (
        f"Error: no image could be read (1 failed; see {tmp_path / 'p.csv'})")
    assert read_csv(tmp_path / "p.csv")[0]["error"]
