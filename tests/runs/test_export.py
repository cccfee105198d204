"""`cornpipe export` (issue 23): ONNX run by onnxruntime, TorchScript and safetensors give what the trained
model gives on real validation photos fed as model_card.json says; the card's sha256 are the files'."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import error_line
from PIL import Image, ImageOps

from cornpipe.cli import cli
from cornpipe.loaders.base import Normalization
from cornpipe.loaders.pixels.augment import val_preprocess
from cornpipe.models import create_model
from cornpipe.runs.checkpoint import load_checkpoint
from cornpipe.runs.config import TrainConfig
from cornpipe.shards.shard_set import ShardSet
from cornpipe.train import train

ort = pytest.importorskip("onnxruntime")
TOLERANCE = 1e-4  # the bound on max |diff| of the probabilities


@pytest.fixture(scope="module")
def run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run that kept EMA weights (the ones predict and export must use)."""
    out = tmp_path_factory.mktemp("export") / "run"
    train(TrainConfig(shards=str(tiny_shards), out=str(out), model="resnet_plus_tiny", image_size=32,
                      batch_size=16, epochs=1, workers=0, device="cpu", bootstrap=0, loader="torch", ema=True))
    return out


@pytest.fixture(scope="module")
def exported(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "deploy"
    result = CliRunner().invoke(cli, ["export", str(run), "--out", str(out)])  # a run folder: its best.pt
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def card(exported: Path) -> dict:
    return json.loads((exported / "model_card.json").read_text())


def card_preprocess(path: Path, card: dict) -> np.ndarray:
    """A photo -> (3, S, S) float32, following only model_card.json (as a deployment outside cornpipe would)."""
    pre, norm = card["preprocessing"], card["input"]["normalization"]
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    side = pre["crop_fraction"] * min(image.size)
    left, top = (image.width - side) / 2, (image.height - side) / 2
    size = pre["image_size"]
    pixels = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)),
                        dtype=np.float32)
    pixels = (pixels - np.array(norm["mean"], np.float32)) / np.array(norm["std"], np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


@pytest.fixture(scope="module")
def val_images(tiny_shards: Path, synth_raw: Path, card: dict) -> np.ndarray:
    """The validation split's photos, preprocessed as the card says: (N, 3, S, S) float32."""
    paths = [synth_raw / s["path"] for s in ShardSet(tiny_shards).samples("val")]
    assert len(paths) >= 3
    return np.stack([card_preprocess(p, card) for p in paths])


@pytest.fixture(scope="module")
def reference(run: Path, val_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the trained model (its EMA weights) gives on the images: softmax (N, P), grade (N,)."""
    state = load_checkpoint(run / "best.pt")
    model = create_model("resnet_plus_tiny", num_positions=len(state["data"]["positions"]),
                         grade_scale=state["data"]["grade_scale"])
    model.load_state_dict(state["ema"]["module"])
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(val_images))
    return out["position"].softmax(1).numpy(), out["grade"].numpy()


def test_card_preprocessing_is_what_predict_feeds_the_model(card: dict, tiny_shards: Path, synth_raw: Path) -> None:
    norm = card["input"]["normalization"]
    for sample in ShardSet(tiny_shards).samples("val")[:4]:
        path = synth_raw / sample["path"]
        with Image.open(path) as image:
            expected = val_preprocess(ImageOps.exif_transpose(image).convert("RGB"), card["input"]["image_size"],
                                      card["preprocessing"]["crop_fraction"],
                                      Normalization(tuple(norm["mean"]), tuple(norm["std"])))
        assert np.abs(card_preprocess(path, card) - expected.numpy()).max() < 1e-5


def test_onnx_in_onnxruntime_matches_torch_on_validation_images(exported: Path, card: dict, val_images: np.ndarray,
                                                                 reference: tuple[np.ndarray, np.ndarray]) -> None:
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [card["input"]["name"]] == ["image"]
    assert [o.name for o in session.get_outputs()] == [o["name"] for o in card["outputs"]] == ["position_probs", "grade"]
    probs, grades = reference
    for batch in (1, 3, len(val_images)):  # the batch axis is dynamic
        got_probs, got_grades = session.run(None, {"image": val_images[:batch]})
        assert got_probs.shape == (batch, len(card["classes"]["position"])) and got_grades.shape == (batch,)
        assert np.abs(got_probs - probs[:batch]).max() <= TOLERANCE
        assert np.abs(got_grades - grades[:batch]).max() <= TOLERANCE * max(card["grade_scale"])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_loads_and_matches(exported: Path, card: dict, val_images: np.ndarray,
                                       reference: tuple[np.ndarray, np.ndarray]) -> None:
    scripted = torch.jit.load(str(exported / "model.torchscript.pt"))
    probs, grades = reference
    for batch in (1, 3):
        with torch.no_grad():
            got_probs, got_grades = scripted(torch.from_numpy(val_images[:batch]))
        assert np.abs(got_probs.numpy() - probs[:batch]).max() <= TOLERANCE
        assert np.abs(got_grades.numpy() - grades[:batch]).max() <= TOLERANCE * max(card["grade_scale"])


def test_safetensors_rebuild_into_a_fresh_cornpipe_model(exported: Path, card: dict, val_images: np.ndarray,
                                                          reference: tuple[np.ndarray, np.ndarray]) -> None:
    from safetensors.torch import load_file

    model = create_model(card["model"]["name"], num_positions=card["model"]["num_positions"],
                         grade_scale=card["grade_scale"], grade_head=card["model"]["grade_head"])
    model.load_state_dict(load_file(str(exported / "model.safetensors")))
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(val_images))
    assert np.abs(out["position"].softmax(1).numpy() - reference[0]).max() <= TOLERANCE


def test_card_says_how_to_feed_the_model_and_hashes_every_file(exported: Path, card: dict, run: Path) -> None:
    state = load_checkpoint(run / "best.pt")
    assert card["classes"]["position"] == state["data"]["positions"]
    assert card["grade_scale"] == state["data"]["grade_scale"]
    assert card["source"]["weights"] == "ema"
    assert card["input"]["shape"] == ["batch", 3, 32, 32] and card["input"]["layout"] == "NCHW"
    assert card["input"]["channel_order"] == "RGB"
    assert card["input"]["normalization"]["mean"] == state["data"]["normalization"]["mean"]
    assert card["validation"]["metrics"] == state["val"]
    assert card["cornpipe_version"] and card["environment"]["onnx"]
    assert card["training_environment"] == state["environment"]
    assert set(card["files"]) == {"model.onnx", "model.torchscript.pt", "model.safetensors"}
    for name, entry in card["files"].items():
        assert entry["sha256"] == hashlib.sha256((exported / name).read_bytes()).hexdigest()


def test_run_records_its_environment(run: Path) -> None:
    """config.json and every checkpoint say what the run ran on (runs.environment)."""
    config = json.loads((run / "config.json").read_text())
    for env in (config["environment"], load_checkpoint(run / "best.pt")["environment"],
                load_checkpoint(run / "last.pt")["environment"]):
        assert env["torch"] == torch.__version__.split("+")[0]
        assert env["device_name"].startswith("cpu")


def test_one_format_only_and_a_used_out_needs_force(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    args = ["export", str(run / "best.pt"), "--out", str(out), "--format", "safetensors"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "model_card.json"]
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "--force" in error_line(again)
    assert CliRunner().invoke(cli, [*args, "--force"]).exit_code == 0


@pytest.mark.parametrize("fmt, words", [("tflite", "unknown export format tflite"), ("onnx", "cornpipe[export]")])
def test_unknown_format_or_missing_onnx_is_one_error_line(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          fmt: str, words: str) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` fails as in an install without the extra
    result = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "d"), "--format", fmt])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert words in error_line(result)
    assert not (tmp_path / "d").exists()


def test_a_corn_grade_head_exports_to_onnx(tmp_path: Path) -> None:
    """The CORN head's cumprod has no ONNX op (torch refused the export); it goes out as exp(cumsum(log))."""
    from cornpipe.runs.export import InferenceModel, write_onnx

    torch.manual_seed(0)
    scale = [0.0, 3.0, 5.0, 7.0, 9.0]
    wrapper = InferenceModel(create_model("resnet_plus_tiny", num_positions=3, grade_scale=scale,
                                          grade_head="corn")).eval()
    write_onnx(wrapper, torch.zeros(2, 3, 32, 32), tmp_path / "corn.onnx", None)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        probs, grades = wrapper(images)
    got_probs, got_grades = ort.InferenceSession(str(tmp_path / "corn.onnx"),
                                                 providers=["CPUExecutionProvider"]).run(None, {"image": images.numpy()})
    assert np.abs(got_probs - probs.numpy()).max() <= TOLERANCE
    assert got_grades.tolist() == grades.tolist() and set(got_grades.tolist()) <= set(scale)


def test_an_op_onnx_lacks_is_one_error_line(tmp_path: Path) -> None:
    from cornpipe.errors import ExportError
    from cornpipe.runs.export import InferenceModel, write_onnx

    class Unexportable(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"position": x.mean((2, 3)), "grade": torch.special.zeta(x.mean((1, 2, 3)) + 2, x.new_tensor(1.5))}

    with pytest.raises(ExportError, match="cannot export this model to ONNX: .*zeta"):
        write_onnx(InferenceModel(Unexportable()), torch.zeros(2, 3, 8, 8), tmp_path / "m.onnx")
