"""The tar shards follow webdataset's conventions: the `webdataset` library reads a position and a grade
from them as they are (`.cls`, `.grade.txt`), DALI's typed reader still reads the raw members, and
shard sets written before (format version 1: `.id`, no text members) still feed every backend."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FORMATS, as_format_version_1, installed
from PIL import Image

from cornpipe.loaders import make_loader
from cornpipe.loaders.base import IMAGENET
from cornpipe.shards import fields as F
from cornpipe.shards.inspect import verify_shards
from cornpipe.shards.shard_set import ShardSet, parse_dali_index
from cornpipe.shards.writers import grade_text


def test_the_webdataset_library_reads_position_grade_and_pixels(tiny_shards: Path) -> None:
    wds = pytest.importorskip("webdataset")
    shards = ShardSet(tiny_shards)
    for split in F.SPLITS:
        tars = [str(tar) for tar, _ in shards.shards(split)]
        got = list(wds.WebDataset(tars, shardshuffle=False).decode("pil")
                   .to_tuple("jpg", "cls", "grade.txt", "__key__", "json"))
        samples = shards.samples(split)
        assert len(got) == len(samples)
        for row, ((image, position, grade, key, meta), s) in enumerate(zip(got, samples, strict=True)):
            assert isinstance(position, int) and position == s["position"]
            assert float(grade) == s["grade"] and key == F.sample_key(s["id"]) and meta["id"] == s["id"]
            with Image.open(io.BytesIO(shards.read_image_bytes(split, row))) as im:
                np.testing.assert_array_equal(np.asarray(image), np.asarray(im.convert("RGB")))


def test_each_member_name_splits_into_the_sample_key_and_one_extension(tiny_shards: Path) -> None:
    """webdataset and DALI both split `<key>.<ext>` at the first dot: `.grade` (raw float32) and
    `.grade.txt` (text) are two members, and the .idx names each under its own extension."""
    shards = ShardSet(tiny_shards)
    [(tar, idx)] = shards.shards("val")
    with tarfile.open(tar) as tf:
        names = [m.name for m in tf.getmembers()]
    key = F.sample_key(shards.samples("val")[0]["id"])
    assert names[:7] == [f"{key}.{ext}" for ext in ("jpg", "position", "grade", "sample_id", "cls", "grade.txt",
                                                     "json")]
    entry = parse_dali_index(idx)[0]
    assert list(entry) == ["jpg", "position", "grade", "sample_id", "cls", "grade.txt", "json"]
    s = shards.samples("val")[0]
    assert shards.read_member("val", 0, "grade.txt") == grade_text(s["grade"]).encode()
    assert np.frombuffer(shards.read_member("val", 0, "grade"), "<f4")[0] == np.float32(s["grade"])
    assert shards.read_member("val", 0, "cls") == str(s["position"]).encode()
    assert [grade_text(g) for g in (0.0, 5, 2.5, 25.0)] == ["0", "5", "2.5", "25"]


def test_dali_reads_the_raw_and_the_text_members_apart(tiny_shards: Path) -> None:
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    shards = ShardSet(tiny_shards)
    n = shards.count("val")
    [(tar, idx)] = shards.shards("val")

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        return tuple(fn.readers.webdataset(
            paths=[str(tar)], index_paths=[str(idx)], ext=["grade", "grade.txt", "cls", F.TAR_ID_EXT],
            dtypes=[types.FLOAT, types.UINT8, types.UINT8, types.INT64], random_shuffle=False,
            missing_component_behavior="error"))

    p = pipe()
    p.build()
    grade, text, cls, sid = (list(out) for out in p.run())
    position, grades, sample_id = shards.labels("val")
    np.testing.assert_array_equal(np.concatenate([np.array(t) for t in grade]), grades)
    assert [float(np.array(t).tobytes()) for t in text] == grades.tolist()
    assert [int(np.array(t).tobytes()) for t in cls] == position.tolist()
    np.testing.assert_array_equal(np.concatenate([np.array(t) for t in sid]), sample_id)


@pytest.fixture(scope="module")
def version_1_shards(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return as_format_version_1(tiny_shards, tmp_path_factory.mktemp("v1") / "shards")


def test_a_format_version_1_set_reads_and_verifies(version_1_shards: Path) -> None:
    shards = ShardSet(version_1_shards)
    assert shards.manifest["format_version"] == 1
    assert "cls" not in shards.index(shards.shards("val")[0][1])[0]
    for row, s in enumerate(shards.samples("val")):  # TAR_ID_EXT finds the old `.id`
        assert np.frombuffer(shards.read_member("val", row, F.TAR_ID_EXT), "<i8")[0] == s["id"]
    assert verify_shards(version_1_shards)


V1_BACKENDS = [
    pytest.param("torch", {}, id="torch"),
    pytest.param("resident", {}, id="resident"),
    pytest.param("dali", {}, id="dali", marks=pytest.mark.skipif(not installed("nvidia.dali"), reason="no DALI")),
    pytest.param("dali", {"reader": "webdataset"}, id="dali-webdataset",
                 marks=pytest.mark.skipif(not installed("nvidia.dali"), reason="no DALI")),
    pytest.param("ffcv", {}, id="ffcv", marks=pytest.mark.skipif("beton" not in FORMATS, reason="no FFCV")),
]


@pytest.mark.parametrize(("backend", "options"), V1_BACKENDS)
def test_every_backend_reads_a_format_version_1_set_as_the_new_one(tiny_shards: Path, version_1_shards: Path,
                                                                    backend: str, options: dict) -> None:
    def val_batches(root: Path) -> list:
        loader = make_loader(root, "val", backend=backend, batch_size=4, image_size=32, device="cpu", workers=1,
                             shuffle=False, options=options, oversample="none", normalization=IMAGENET)
        try:
            return list(loader)
        finally:
            loader.close()

    new, old = val_batches(tiny_shards), val_batches(version_1_shards)
    assert sum(len(b.position) for b in old) == ShardSet(version_1_shards).count("val")
    for a, b in zip(new, old, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
