"""`cornpipe explain` and the report's activation-map panel: one PNG per image, maps in [0, 1], bad input listed."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_run, error_line, jpeg_bytes
from PIL import Image

from cornpipe.errors import CornpipeError
from cornpipe.models import create_model
from cornpipe.runs.cam import EXTRA_MISSING, class_maps, target_layer
from cornpipe.runs.config import TrainConfig
from cornpipe.runs.explain import CAM_PANEL_FILE, png_size
from cornpipe.shards.shard_set import ShardSet
from cornpipe.train import train

pytest.importorskip("pytorch_grad_cam")


@pytest.fixture(scope="module")
def run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory, real_cam_panel) -> Path:
    out = tmp_path_factory.mktemp("explain") / "run"
    with pytest.MonkeyPatch.context() as patch:  # the suite skips the panel elsewhere (conftest)
        patch.setattr("cornpipe.runs.run_dir._cam_panel", real_cam_panel)
        train(TrainConfig(shards=str(tiny_shards), out=str(out), model="resnet_plus_tiny", image_size=32,
                          batch_size=16, epochs=1, workers=0, device="cpu", bootstrap=0, loader="torch"))
    return out


def surveyed(synth_raw: Path, tiny_shards: Path, n: int) -> list[Path]:
    """n validation images of the shard set, as their survey files."""
    return [synth_raw / s["path"] for s in ShardSet(tiny_shards).samples("val")[:n]]


def png_shape(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_one_png_per_image_with_the_true_map_when_known(run: Path, synth_raw: Path, tiny_shards: Path,
                                                       tmp_path: Path) -> None:
    """A surveyed image (its position is in the shard set) gets photo + predicted + true; a new photo,
    whose position nobody gave, gets photo + predicted."""
    new = tmp_path / "field_photo.jpg"
    new.write_bytes(jpeg_bytes(1, size=80))
    images = [*surveyed(synth_raw, tiny_shards, 2), new]
    result = cli_run("explain", run, *images, "--out", tmp_path / "maps")
    assert result.exit_code == 0, result.output
    assert "explained 3 image(s), 0 unreadable" in result.output
    pngs = sorted((tmp_path / "maps").iterdir())
    assert [p.name for p in pngs] == sorted(f"{p.stem}.cam.png" for p in images)
    for image in images:
        panels = 2 if image == new else 3
        assert png_shape(tmp_path / "maps" / f"{image.stem}.cam.png") == png_size(panels)


def test_labels_csv_gives_the_true_map(run: Path, tmp_path: Path) -> None:
    new = tmp_path / "photos" / "leaf.jpg"
    new.parent.mkdir()
    new.write_bytes(jpeg_bytes(2, size=80))
    (tmp_path / "labels.csv").write_text("path,position\nphotos/leaf.jpg,upper\n")
    result = cli_run("explain", run, new, "--out", tmp_path / "maps", "--labels", tmp_path / "labels.csv")
    assert result.exit_code == 0, result.output
    assert png_shape(tmp_path / "maps" / "leaf.cam.png") == png_size(3)

    (tmp_path / "bad.csv").write_text("path,position\nphotos/leaf.jpg,top\n")
    bad = cli_run("explain", run, new, "--out", tmp_path / "maps2", "--labels", tmp_path / "bad.csv")
    assert bad.exit_code == 1
    assert "position 'top' is not one of the model's" in error_line(bad)


def test_cam_of_a_trained_model_is_finite_and_in_unit_range(run: Path, synth_raw: Path, tiny_shards: Path) -> None:
    from cornpipe.runs.explain import _load
    from cornpipe.runs.inference_input import load_for_inference

    model, state = _load(run, "cpu")
    images = torch.stack([load_for_inference(p, state["data"]["convert"], 32, model.normalization)
                          for p in surveyed(synth_raw, tiny_shards, 4)])
    for position in range(len(model.positions)):
        maps = class_maps(model.model, images, [position] * len(images))
        assert maps.shape == (4, 32, 32)
        assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
        assert maps.max() > 0.0  # a map, not a blank: the gradients reached the target layer


def test_target_layer_is_the_last_stage_the_image_size_resolves() -> None:
    model = create_model("resnet_plus_tiny", num_positions=3, grade_scale=[0, 3, 5, 7, 9])
    assert target_layer(model, 224)[0] == "trunk.layer4"  # 7x7 cells
    assert target_layer(model, 32)[0] == "trunk.layer2"  # layer4 would be 1x1, layer3 2x2: nowhere to point


def test_a_trunk_grad_cam_cannot_map_is_one_cornpipe_error() -> None:
    """A ViT's blocks give tokens, not a (B, C, H, W) map: said in one line, never a traceback."""
    model = create_model("timm:vit_tiny_patch16_224", num_positions=3, grade_scale=[0, 3, 5, 7, 9]).eval()
    with pytest.raises(CornpipeError, match="Grad-CAM needs a trunk whose last stage is a convolutional"):
        class_maps(model, torch.zeros(1, 3, 224, 224), [0])


def test_unreadable_image_is_listed_and_alone_is_one_error_line(run: Path, synth_raw: Path, tiny_shards: Path,
                                                                tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    good = surveyed(synth_raw, tiny_shards, 1)[0]
    result = cli_run("explain", run, broken, good, "--out", tmp_path / "maps")
    assert result.exit_code == 0, result.output
    assert f"unreadable: {broken}: " in result.output
    assert "explained 1 image(s), 1 unreadable" in result.output
    assert [p.name for p in (tmp_path / "maps").iterdir()] == [f"{good.stem}.cam.png"]

    alone = cli_run("explain", run, broken, "--out", tmp_path / "maps2")
    assert alone.exit_code == 1
    assert error_line(alone) == "Error: no image could be read (1 failed)"


def test_missing_grad_cam_is_one_error_line_naming_the_extra(run: Path, synth_raw: Path, tiny_shards: Path,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # `import pytorch_grad_cam` fails, as without it
    result = cli_run("explain", run, surveyed(synth_raw, tiny_shards, 1)[0], "--out", tmp_path / "maps")
    assert result.exit_code == 1
    assert error_line(result) == f"Error: {EXTRA_MISSING}"
    assert "cornpipe[explain]" in EXTRA_MISSING


def test_report_of_a_run_has_the_panel(run: Path) -> None:
    """Training ends with cam_panel.png (a few validation images per class) linked from report.md."""
    assert (run / CAM_PANEL_FILE).is_file()
    with Image.open(run / CAM_PANEL_FILE) as panel:
        assert panel.width > 200 and panel.height > 200
    report = (run / "report.md").read_text()
    assert "## What the model looks at" in report
    assert f"]({CAM_PANEL_FILE})" in report


def test_training_without_grad_cam_ends_and_the_report_says_how_to_get_the_panel(
        tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_cam_panel) -> None:
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    monkeypatch.setattr("cornpipe.runs.run_dir._cam_panel", real_cam_panel)
    out = tmp_path / "run"
    train(TrainConfig(shards=str(tiny_shards), out=str(out), model="resnet_plus_tiny", image_size=32,
                      batch_size=16, epochs=1, workers=0, device="cpu", bootstrap=0, loader="torch",
                      max_batches=1))
    assert (out / "best.pt").is_file() and not (out / CAM_PANEL_FILE).exists()
    assert "pip install 'cornpipe[explain]'" in (out / "report.md").read_text()
