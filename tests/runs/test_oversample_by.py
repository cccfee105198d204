"""`--oversample-by position,origin` (issue 27 item 5): a run's draw balances position x a metadata column, the
option travels through the config and `cornpipe cv`, a key the shard set lacks is one `Error:` line, and the
report breaks every metric down by that column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_run, error_line, field_lab_shards_of

from cornpipe.errors import ConfigError
from cornpipe.runs.config import TrainConfig, load_toml, to_toml


@pytest.fixture(scope="module")
def field_lab_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 images from a manifest CSV with an `origin` column: a quarter field photos."""
    return field_lab_shards_of(16, tmp_path_factory.mktemp("overby"))


QUICK = ["--model", "resnet_plus_tiny", "--image-size", "32", "--epochs", "1", "--workers", "0", "--device", "cpu",
         "--loader", "torch", "--bootstrap", "0", "--no-verify", "--batch-size", "8"]


def test_the_keys_are_one_comma_string_from_a_flag_a_toml_list_or_a_printed_config(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('shards = "s"\nout = "o"\noversample_by = ["position", "origin"]\n')
    from_list = TrainConfig.from_dict(load_toml(toml))
    assert from_list.oversample_by == "position,origin"
    assert TrainConfig(oversample_by=" position , origin,origin").oversample_by == "position,origin"
    toml.write_text(to_toml(from_list))
    assert TrainConfig.from_dict(load_toml(toml)) == from_list
    assert TrainConfig().oversample_by == "position"  # the default: the draw runs always had
    with pytest.raises(ConfigError, match="position plus"):
        TrainConfig(oversample_by="origin")


def test_a_key_the_shard_set_lacks_is_one_error_line_naming_its_keys(field_lab_shards: Path, tmp_path: Path) -> None:
    result = cli_run("train", field_lab_shards, "--out", tmp_path / "run", "--oversample-by", "position,camera", *QUICK)
    assert result.exit_code != 0
    line = error_line(result)
    assert "camera" in line and "position, grade, origin" in line, line
    assert not (tmp_path / "run").exists()  # refused before anything was made


def test_cv_passes_the_keys_to_every_run_and_cv_md_breaks_down_by_origin(field_lab_shards: Path,
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "cv"
    result = cli_run("cv", field_lab_shards, "--out", out, "--folds", "2", "--oversample-by", "position,origin",
                     *QUICK)
    assert result.exit_code == 0, result.output
    assert "oversample balanced by position,origin" in result.output  # the start line says what was drawn
    configs = [json.loads(p.read_text()) for p in out.glob("*/config.json")]
    assert len(configs) == 2 and all(c["oversample_by"] == "position,origin" for c in configs)
    md = (out / "cv.md").read_text()
    assert "### By origin" in md
    assert "| field | 4 |" in md and "| lab | 12 |" in md  # every sample once, out of fold
