"""The recipes in configs/ are read as `cornpipe train --config FILE` reads them: every one is a valid
TrainConfig, and `make demo` trains with configs/demo.toml exactly as it did with its flags."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import cli_run

from cornpipe.runs.config import TrainConfig, load_toml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))

# `make demo`'s and `make demo-pretrained`'s train flags before the recipes became files
DEMO_FLAGS = ["--model", "resnet_plus_tiny", "--image-size", "64", "--batch-size", "16", "--epochs", "14",
              "--lr", "4e-3", "--schedule", "cosine", "--grade-head", "corn", "--ema", "--oversample", "balanced",
              "--loader", "resident"]
DEMO_PRETRAINED_FLAGS = ["--model", "timm:tf_efficientnet_lite0", "--freeze-epochs", "1", "--image-size", "96",
                         "--batch-size", "32", "--epochs", "8", "--lr", "2e-3", "--schedule", "cosine",
                         "--oversample", "balanced", "--loader", "resident"]


def train_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *flags: str) -> TrainConfig:
    """The TrainConfig `cornpipe train SHARDS --out RUN FLAGS...` would train with (training itself stubbed)."""
    import cornpipe.train

    seen: list[TrainConfig] = []
    monkeypatch.setattr(cornpipe.train, "train", lambda cfg, *args, **kwargs: seen.append(cfg))
    shards = tmp_path / "shards"
    shards.mkdir(exist_ok=True)
    result = cli_run("train", shards, "--out", tmp_path / "run", *flags)
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    return cfg


def test_the_recipes_a_user_is_promised_are_there() -> None:
    assert {p.name for p in CONFIGS} >= {"demo.toml", "demo-pretrained.toml", "survey.toml"}


@pytest.mark.parametrize("recipe", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads_into_a_valid_config(recipe: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    values = load_toml(recipe)
    assert not {"shards", "out"} & set(values), "a recipe leaves SHARDS and --out to the command line"
    cfg = train_config(tmp_path, monkeypatch, "--config", recipe)
    assert cfg.shards == str(tmp_path / "shards") and cfg.out == str(tmp_path / "run")
    for key, value in values.items():  # the file's values, not the defaults, reached the run
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(cfg, key.replace("-", "_")) == expected, key


def test_demo_recipe_is_the_makefiles_former_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_file = train_config(tmp_path, monkeypatch, "--config", ROOT / "configs" / "demo.toml")
    assert from_file == train_config(tmp_path, monkeypatch, *DEMO_FLAGS)


def test_pretrained_demo_recipe_is_the_makefiles_former_flags(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "lite0.pth"
    weights.write_bytes(b"")  # the weights file stays a flag; the config only records its path
    from_file = train_config(tmp_path, monkeypatch, "--config", ROOT / "configs" / "demo-pretrained.toml",
                             "--init-weights", str(weights))
    assert from_file == train_config(tmp_path, monkeypatch, *DEMO_PRETRAINED_FLAGS, "--init-weights", str(weights))


def test_a_flag_overrides_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = train_config(tmp_path, monkeypatch, "--config", ROOT / "configs" / "demo.toml", "--epochs", "1")
    assert cfg.epochs == 1 and cfg.model == "resnet_plus_tiny"


@pytest.mark.parametrize(("target", "recipe"), [("demo", "demo.toml"), ("demo-pretrained", "demo-pretrained.toml")])
def test_make_demo_trains_with_its_recipe(target: str, recipe: str) -> None:
    makefile = (ROOT / "Makefile").read_text()
    body = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert body is not None, f"no {target} target"
    train = next(line for line in body.group(1).replace("\\\n", " ").splitlines() if "cornpipe train" in line)
    assert f"--config configs/{recipe}" in train
