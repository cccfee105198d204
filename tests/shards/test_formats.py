"""`convert --formats`: a tar-shards-only shard set is made, verified and inspected on a machine
without FFCV (the bare GPU box), and asking for a .beton there is one `Error:` line naming the fix."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import cli_run as run
from conftest import error_line

from cornpipe.errors import ConvertError, LoaderError
from cornpipe.shards import fields as F
from cornpipe.shards.convert import convert_dataset
from cornpipe.shards.inspect import verify_shards
from cornpipe.shards.manifest import write_manifest_hash
from cornpipe.shards.shard_set import ShardSet

NO_FFCV = ("Error: writing .beton files needs FFCV: pip install 'cornpipe[ffcv]', or convert with --formats wds "
           "(tar shards only, enough for the torch, resident and dali backends)")


@pytest.fixture
def without_ffcv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `import ffcv...` fails from here on, as where FFCV is not installed (restored after)."""
    for name in [n for n in sys.modules if n == "ffcv" or n.startswith("ffcv.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "ffcv", None)


def test_beton_without_ffcv_is_one_error_line(synth_raw: Path, tmp_path: Path, without_ffcv: None) -> None:
    out = tmp_path / "shards"
    result = run("convert", synth_raw, out, "--max-resolution", 32, "--workers", 1)
    assert result.exit_code == 1
    assert error_line(result) == NO_FFCV
    result = run("convert", synth_raw, out, "--formats", "wds,beton", "--workers", 1)
    assert error_line(result) == NO_FFCV
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_wds_only_needs_no_ffcv_and_writes_the_same_shards(synth_raw: Path, tiny_shards: Path, tmp_path: Path,
                                                           without_ffcv: None) -> None:
    out = tmp_path / "wds"
    # the settings of tiny_shards (beton + wds), so the tar shards must come out byte for byte the same
    result = run("convert", synth_raw, out, "--formats", "wds", "--max-resolution", 96, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "(train 43, val 11)" in result.output
    assert sorted(p.name for p in out.glob("*.beton")) == []
    m = json.loads((out / F.MANIFEST).read_text())
    assert m["params"]["formats"] == ["wds"]
    assert {s: m["splits"][s]["beton"] for s in F.SPLITS} == {"train": None, "val": None}
    both = json.loads((tiny_shards / F.MANIFEST).read_text())
    assert set(m["files"]) == {n for n in both["files"] if not n.endswith(".beton")}
    for name, entry in m["files"].items():
        assert both["files"][name] == entry, name
    assert m["samples"] == both["samples"]

    result = run("verify", out)
    assert result.exit_code == 0, result.output
    assert "decoded 54 images from tar shards (no .beton: converted with --formats wds)" in result.output
    result = run("inspect", out)
    assert result.exit_code == 0, result.output
    assert "formats wds; tar shards only (no .beton)" in result.output
    info = json.loads(run("inspect", out, "--json").output)
    assert info["formats"] == ["wds"] and info["bytes"]["beton"] == 0 and info["splits"] == {"train": 43, "val": 11}

    shards = ShardSet(out)
    assert not shards.has_beton and shards.formats == ("wds",)
    with pytest.raises(LoaderError) as err:
        shards.beton_path("train")
    assert str(err.value) == (f"{out} has no .beton files (converted with --formats wds); reconvert with "
                              f"--formats beton,wds for the ffcv backend")
    assert len(shards.read_image_bytes("val", 0)) > 0


def test_formats_without_wds_or_unknown_are_refused(synth_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    result = run("convert", synth_raw, out, "--formats", "beton")
    assert result.exit_code == 1
    assert error_line(result) == ("Error: --formats must include wds: the torch, resident and dali backends, "
                                  "inspect and verify read the tar shards (use --formats beton,wds or "
                                  "--formats wds)")
    result = run("convert", synth_raw, out, "--formats", "wds,tfrecord")
    assert error_line(result) == "Error: --formats must be a comma list of beton, wds, not 'wds,tfrecord'"
    with pytest.raises(ConvertError, match="comma list"):
        convert_dataset(synth_raw, out, formats=[])
    assert not out.exists()


def test_manifest_without_formats_means_both(tiny_shards: Path, tmp_path: Path) -> None:
    """Shard sets converted before --formats existed keep working, .beton included."""
    copy = tmp_path / "old"
    shutil.copytree(tiny_shards, copy)
    m = json.loads((copy / F.MANIFEST).read_text())
    assert m["params"].pop("formats") == ["beton", "wds"]
    (copy / F.MANIFEST).write_text(json.dumps(m))
    write_manifest_hash(copy)  # the edit above is ours: record it, as convert would have
    shards = ShardSet(copy)
    assert shards.has_beton and shards.formats == ("beton", "wds")
    assert shards.beton_path("val") == copy / "val.beton"
    report = verify_shards(copy)
    assert (report["beton_images"], report["tar_images"]) == (54, 54)

    m["params"]["formats"] = ["wds"]  # says no .beton, yet the splits name one
    (copy / F.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(LoaderError, match=r"manifest.json is corrupt \(split train .beton entry does not match "
                                          r"params.formats wds\)"):
        ShardSet(copy)
