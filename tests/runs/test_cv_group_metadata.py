"""`cv --group KEY`: leave one group out by stage, source or any metadata column of the manifest CSV; a key
the samples do not have is refused before any training, with one `Error:` line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cli_run, error_line, field_lab_shards_of

from cornpipe.errors import ConfigError
from cornpipe.runs.config import TrainConfig
from cornpipe.runs.cv import fold_assignment


@pytest.fixture(scope="module")
def field_lab_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 images from a manifest CSV without source or stage, with an `origin` (field/lab) column."""
    return field_lab_shards_of(12, tmp_path_factory.mktemp("fieldlab"))


# should a refusal regress, the runs it would start are over in seconds
QUICK = ["--model", "resnet_plus_tiny", "--image-size", "32", "--epochs", "1", "--workers", "0", "--device", "cpu",
         "--loader", "torch", "--bootstrap", "0", "--no-verify"]


def config(shards: Path, group: str) -> TrainConfig:
    return TrainConfig(shards=str(shards), out="unused", fold_group=group)


def test_a_metadata_column_is_a_group_key(field_lab_shards: Path) -> None:
    from cornpipe.shards.shard_set import ShardSet

    samples = ShardSet(field_lab_shards).manifest["samples"]
    fold, names = fold_assignment(samples, config(field_lab_shards, "origin"))
    assert names == ["origin field", "origin lab"]
    for s, f in zip(samples, fold, strict=True):
        assert names[f] == f"origin {s['meta']['origin']}"


def test_cv_group_by_an_unknown_source_is_refused_in_one_line(field_lab_shards: Path, tmp_path: Path) -> None:
    for key in ("source", "stage"):
        result = cli_run("cv", field_lab_shards, "--out", tmp_path / key, "--group", key, *QUICK)
        assert result.exit_code != 0
        line = error_line(result)
        assert key in line and "unknown" in line, line
        assert not (tmp_path / key).exists() or not any((tmp_path / key).iterdir())  # nothing trained


def test_cv_group_by_a_key_no_sample_has_names_the_keys_there_are(field_lab_shards: Path, tmp_path: Path) -> None:
    result = cli_run("cv", field_lab_shards, "--out", tmp_path / "cv", "--group", "camera", *QUICK)
    assert result.exit_code != 0
    line = error_line(result)
    assert "camera" in line and "origin" in line, line


def test_the_folder_layout_still_groups_by_source_and_stage(tiny_shards: Path) -> None:
    from cornpipe.shards.shard_set import ShardSet

    samples = ShardSet(tiny_shards).manifest["samples"]
    assert len(fold_assignment(samples, config(tiny_shards, "source"))[1]) == 9
    assert fold_assignment(samples, config(tiny_shards, "stage"))[1] == ["stage 9", "stage 14", "stage 19"]
    with pytest.raises(ConfigError, match="origin"):
        fold_assignment(samples, config(tiny_shards, "origin"))
