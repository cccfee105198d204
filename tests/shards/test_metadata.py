"""Honest sample metadata: source and stage come from the manifest CSV's columns or the folder layout, never
from the labels; every other manifest CSV column is kept as per-sample metadata in manifest.json."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import cli_run, jpeg_bytes

from cornpipe.shards.convert import convert_dataset
from cornpipe.shards.discover import discover
from cornpipe.shards.shard_set import ShardSet


def write_survey(folder: Path, header: str, rows: list[str]) -> Path:
    """A manifest CSV `labels.csv` in `folder` with one noise JPEG per row (the row's first cell names it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        (folder / row.split(",")[0]).write_bytes(jpeg_bytes(i))
    csv = folder / "labels.csv"
    csv.write_text("\n".join([header, *rows]) + "\n")
    return csv


def rows(n: int, extra: str = "") -> list[str]:
    return [f"img{i:02d}.jpg,{'lmt'[i % 3]},{(0, 3, 5)[i % 3]}{extra}" for i in range(n)]


def test_without_a_source_column_the_source_is_unknown_not_the_position(tmp_path: Path) -> None:
    csv = write_survey(tmp_path / "raw", "path,position,grade", rows(6))
    found = discover(None, manifest_csv=csv)
    assert {c.source for c in found.samples} == {"unknown"}
    assert {c.stage for c in found.samples} == {None}


def test_a_stage_column_alone_gives_the_stage_but_no_source(tmp_path: Path) -> None:
    csv = write_survey(tmp_path / "raw", "path,position,grade,stage", rows(6, ",14"))
    found = discover(None, manifest_csv=csv)
    assert {(c.source, c.stage) for c in found.samples} == {("unknown", 14)}


def test_a_source_column_still_gives_source_and_stage(tmp_path: Path) -> None:
    header = "path,position,grade,source"
    csv = write_survey(tmp_path / "raw", header, [f"a{i}.jpg,{p},0,9{p}" for i, p in enumerate("lmt")])
    found = discover(None, manifest_csv=csv)
    assert sorted((c.source, c.stage) for c in found.samples) == [("9l", 9), ("9m", 9), ("9t", 9)]


def test_extra_manifest_columns_are_kept_as_metadata(tmp_path: Path) -> None:
    header = "path,position,grade,origin,Camera"
    data = [f"{r},{'field' if i < 3 else 'lab'},{'cam' + str(i % 2) if i != 4 else ''}" for i, r in enumerate(rows(9))]
    csv = write_survey(tmp_path / "raw", header, data)
    out = tmp_path / "shards"
    convert_dataset(None, out, manifest_csv=csv, max_resolution=32, workers=1, formats=("wds",))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metadata"] == ["camera", "origin"]
    by_path = {s["path"]: s for s in manifest["samples"]}
    assert by_path["img00.jpg"]["meta"] == {"origin": "field", "camera": "cam0"}
    assert by_path["img05.jpg"]["meta"] == {"origin": "lab", "camera": "cam1"}
    assert by_path["img04.jpg"]["meta"] == {"origin": "lab"}  # an empty cell is no value, not ""
    assert {s["source"] for s in manifest["samples"]} == {"unknown"}
    assert ShardSet(out).metadata_keys() == ["camera", "origin"]


def test_inspect_shows_no_source_invented_from_the_positions(tmp_path: Path) -> None:
    csv = write_survey(tmp_path / "raw", "path,position,grade", rows(9))
    out = tmp_path / "shards"
    convert_dataset(None, out, manifest_csv=csv, max_resolution=32, workers=1, formats=("wds",))
    result = cli_run("inspect", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["sources"] == ["unknown"]


def test_the_folder_layout_still_names_sources_and_stages(tiny_shards: Path) -> None:
    shards = ShardSet(tiny_shards)
    assert {s["source"] for s in shards.manifest["samples"]} == {f"{st}{c}" for st in (9, 14, 19) for c in "lmt"}
    assert all(s["stage"] in (9, 14, 19) for s in shards.manifest["samples"])
    assert shards.metadata_keys() == []  # the folder layout has no extra columns


def test_a_manifest_from_before_metadata_reads(tiny_shards: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for path in tiny_shards.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.pop("metadata", None)
    for s in manifest["samples"]:
        s.pop("meta", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    shards = ShardSet(old)
    assert shards.metadata_keys() == []
    assert shards.sample_value(shards.manifest["samples"][0], "source") == manifest["samples"][0]["source"]


def test_inspect_counts_each_metadata_value(tmp_path: Path) -> None:
    data = [f"{r},{'field' if i < 3 else 'lab'}" for i, r in enumerate(rows(9))]
    out = tmp_path / "shards"
    convert_dataset(None, out, manifest_csv=write_survey(tmp_path / "raw", "path,position,grade,origin", data),
                    max_resolution=32, workers=1, formats=("wds",))
    summary = json.loads(cli_run("inspect", out, "--json").output)
    counts = summary["metadata"]["origin"]
    assert sum(counts["train"].values()) + sum(counts["val"].values()) == 9
    assert counts["train"].get("field", 0) + counts["val"].get("field", 0) == 3
    text = " ".join(cli_run("inspect", out).output.split())
    assert "origin" in text and "field" in text and "lab" in text
