"""`cornpipe train ... --print-config` (issue 23 item 4): the resolved config as the TOML `--config` reads,
printed without training; fed back, it gives the run the same config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from conftest import cli_run

from cornpipe.runs.config import TrainConfig, load_toml, to_toml

FLAGS = ["--model", "resnet_plus_tiny", "--image-size", "32", "--batch-size", "16", "--max-batches", "1",
         "--workers", "0", "--epochs", "1", "--device", "cpu", "--bootstrap", "0", "--no-verify",
         "--loss-weights", "0.6,0.4", "--lr", "0.002", "--ema", "--oversample", "sqrt", "--no-freeze-bn"]
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def run_config(run: Path) -> dict:
    """config.json's TrainConfig fields (it also holds `data` and `environment`), `out` aside."""
    saved = json.loads((run / "config.json").read_text())
    return {name: saved[name] for name in FIELDS if name != "out"}


def test_printed_config_fed_back_reproduces_the_run_config(tiny_shards: Path, tmp_path: Path) -> None:
    toml_config = tmp_path / "config.toml"
    toml_config.write_text('image_size = 48\nseed = 3\n')  # flags given beside --config win, as in a run
    printed = cli_run("train", tiny_shards, "--out", tmp_path / "printed", "--config", toml_config, *FLAGS,
                      "--print-config")
    assert printed.exit_code == 0, printed.output
    assert not (tmp_path / "printed").exists()  # nothing trained, no folder made
    (tmp_path / "run.toml").write_text(printed.stdout)

    fed_back = cli_run("train", "--config", tmp_path / "run.toml", "--out", tmp_path / "fed_back")
    assert fed_back.exit_code == 0, fed_back.output
    direct = cli_run("train", tiny_shards, "--out", tmp_path / "direct", "--config", toml_config, *FLAGS)
    assert direct.exit_code == 0, direct.output
    assert run_config(tmp_path / "fed_back") == run_config(tmp_path / "direct")
    assert run_config(tmp_path / "direct")["seed"] == 3 and run_config(tmp_path / "direct")["image_size"] == 32


def test_toml_round_trip_of_awkward_values(tmp_path: Path) -> None:
    cfg = TrainConfig(shards='C:\\data\\"maize" shards\tü 🌽\x7f', out="run\n2", workers=None, compile=False,
                      loss_weights=(1, 0), min_lr=1e-9, dist_timeout=1e12, init_weights=None)
    path = tmp_path / "run.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    values = load_toml(path)
    assert "workers" not in values and "init_weights" not in values  # None: the default, left out
    assert TrainConfig.from_dict(values) == cfg
