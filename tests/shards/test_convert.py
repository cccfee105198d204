"""convert -> shards round trips: labels stay with their images in every format, pixels survive,
DALI reads what we wrote, the split is stratified, and a killed run leaves nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from cornpipe.errors import LoaderError
from cornpipe.shards import fields as F
from cornpipe.shards.convert import convert_dataset
from cornpipe.shards.imageio import decode_jpeg_rgb
from cornpipe.shards.manifest import sha256_file
from cornpipe.shards.shard_set import BetonFile, ShardSet, parse_dali_index
from cornpipe.shards.split import assign_split

REPO = Path(__file__).resolve().parents[2]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def reference_pixels(src_root: Path, sample: dict, max_resolution: int) -> np.ndarray:
    """An independent PIL decode of the source, resized as convert documents (LANCZOS, longest side)."""
    with Image.open(src_root / sample["path"]) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = im.size
        longest = max(w, h)
        if longest > max_resolution:
            s = max_resolution / longest
            size = (max(1, round(w * s)), max(1, round(h * s)))
            im = im.resize(size, Image.Resampling.LANCZOS)
        assert (sample["width"], sample["height"]) == im.size
        return np.asarray(im)


def check_round_trip(src: Path, out: Path, max_resolution: int, exact_beton: bool,
                     tar_psnr: float = 35.0) -> None:
    shards = ShardSet(out)
    seen_ids = []
    for split in F.SPLITS:
        samples = shards.samples(split)
        position, grade, sample_id = shards.labels(split)
        beton = BetonFile(shards.beton_path(split))
        np.testing.assert_array_equal(beton.column(F.POSITION), position)
        np.testing.assert_array_equal(beton.column(F.GRADE).astype(np.float32), grade)
        np.testing.assert_array_equal(beton.column(F.SAMPLE_ID), sample_id)
        np.testing.assert_array_equal(beton.column(F.SOURCE_ID),
                                      [shards.sources.index(s["source"]) for s in samples])
        for row, s in enumerate(samples):
            seen_ids.append(s["id"])
            ref = reference_pixels(src, s, max_resolution)
            got_beton = beton.image(row)
            got_tar = decode_jpeg_rgb(shards.read_image_bytes(split, row))
            if exact_beton:
                np.testing.assert_array_equal(got_beton, ref)
            else:
                assert psnr(got_beton, ref) >= 35.0, s["path"]
            assert psnr(got_tar, ref) >= tar_psnr, s["path"]
            # labels inside the tar shard equal the manifest
            assert np.frombuffer(shards.read_member(split, row, "position"), "<i8")[0] == s["position"]
            assert np.frombuffer(shards.read_member(split, row, "grade"), "<f4")[0] == np.float32(s["grade"])
            assert np.frombuffer(shards.read_member(split, row, F.TAR_ID_EXT), "<i8")[0] == s["id"]
            meta = json.loads(shards.read_member(split, row, "json"))
            assert (meta["path"], meta["source"], meta["position"]) == (s["path"], s["source"], s["position"])
    assert sorted(seen_ids) == list(range(len(seen_ids)))


def test_round_trip_jpg(synth_raw: Path, tiny_shards: Path) -> None:
    check_round_trip(synth_raw, tiny_shards, 96, exact_beton=False)
    shards = ShardSet(tiny_shards)
    m = shards.manifest
    assert m["counts"]["found"] == m["counts"]["converted"] + m["counts"]["rejected"] == 54
    # jpg mode: the .beton stores the very JPEG bytes the tar shard holds
    beton = BetonFile(shards.beton_path("val"))
    for row in range(shards.count("val")):
        mode, _, _, data = beton.image_record(row)
        assert mode == "jpg" and data == shards.read_image_bytes("val", row)


def test_round_trip_raw_with_resize(synth_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    summary = convert_dataset(synth_raw, out, max_resolution=64, write_mode="raw", workers=1, seed=3)
    assert summary.converted == 54 and summary.split_counts == {"train": 43, "val": 11}
    # raw .beton: exact pixels. The tar shards hold JPEG in every mode (quality 90, 4:2:0 chroma),
    # and noisy 64 px thumbnails lose more to chroma subsampling than photos do: >= 30 dB here.
    check_round_trip(synth_raw, out, 64, exact_beton=True, tar_psnr=30.0)
    assert BetonFile(out / "train.beton").image_record(0)[0] == "raw"
    assert ShardSet(out).samples("train")[0]["width"] == 64


def test_round_trip_jpg_with_resize(tmp_path: Path) -> None:
    from cornpipe.shards.synth import make_synthetic

    src = tmp_path / "raw"
    make_synthetic(src, per_source=1, image_size=256, seed=1, workers=1)
    out = tmp_path / "jpg"
    convert_dataset(src, out, max_resolution=192, write_mode="jpg", val_fraction=0.3, workers=2)
    check_round_trip(src, out, 192, exact_beton=False)
    assert {s["width"] for s in ShardSet(out).manifest["samples"]} == {192}


def test_manifest_layout(tiny_shards: Path) -> None:
    m = json.loads((tiny_shards / F.MANIFEST).read_text())
    assert m["format_version"] == F.FORMAT_VERSION
    assert m["positions"] == ["lower", "middle", "upper"]
    assert m["sources"] == list(F.SOURCES)
    assert m["grade_scale"] == [0, 3, 5, 7, 9]
    assert m["params"]["write_mode"] == "jpg" and m["params"]["max_resolution"] == 96
    assert m["params"]["formats"] == ["beton", "wds"]  # the default: both
    on_disk = {p.name for p in tiny_shards.iterdir()} - {F.MANIFEST, F.MANIFEST_HASH}
    assert set(m["files"]) == on_disk
    digest, name = (tiny_shards / F.MANIFEST_HASH).read_text().split()
    assert name == F.MANIFEST and digest == sha256_file(tiny_shards / F.MANIFEST)
    for split in F.SPLITS:
        entry = m["splits"][split]
        assert entry["beton"] == f"{split}.beton"
        assert [s["tar"] for s in entry["shards"]] == [f"{split}-000000.tar"]
        assert sum(s["count"] for s in entry["shards"]) == entry["count"]
    cells = m["counts"]["cells"]
    assert sum(n for src in cells["val"].values() for pos in src.values() for n in pos.values()) == 11
    sample = m["samples"][0]
    assert {"id", "split", "row", "path", "source", "stage", "position", "grade", "width", "height",
            "sha256"} <= set(sample)


def test_index_is_dalis_wds2idx_format(tiny_shards: Path, tmp_path: Path) -> None:
    wds2idx = pytest.importorskip("wds2idx")  # ships with nvidia-dali
    tar = tiny_shards / "train-000000.tar"
    theirs = tmp_path / "theirs.idx"
    creator = wds2idx.IndexCreator(str(tar), str(theirs), verbose=False)
    creator.create_index()
    creator.close()
    assert (tiny_shards / "train-000000.idx").read_text() == theirs.read_text()


def test_dali_webdataset_reader_reads_shards(tiny_shards: Path) -> None:
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    shards = ShardSet(tiny_shards)
    n = shards.count("val")
    tars, idxs = zip(*shards.shards("val"), strict=True)

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        jpg, pos, grade, sid = fn.readers.webdataset(
            paths=[str(p) for p in tars], index_paths=[str(p) for p in idxs],
            ext=["jpg", "position", "grade", F.TAR_ID_EXT],  # "sample_id;id": either format version
            dtypes=[types.UINT8, types.INT64, types.FLOAT, types.INT64], random_shuffle=False)
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), pos, grade, sid

    p = pipe()
    p.build()
    images, pos, grade, sid = p.run()
    position, grades, sample_id = shards.labels("val")
    np.testing.assert_array_equal(np.concatenate([np.array(t) for t in pos]), position)
    np.testing.assert_array_equal(np.concatenate([np.array(t) for t in grade]), grades)
    np.testing.assert_array_equal(np.concatenate([np.array(t) for t in sid]), sample_id)
    for row, s in enumerate(shards.samples("val")):
        assert np.array(images[row]).shape == (s["height"], s["width"], 3)


def test_split_is_stratified_seeded_and_never_empty() -> None:
    rng = np.random.default_rng(0)
    position = rng.integers(0, 3, 500)
    grade = rng.choice([0.0, 3.0, 5.0, 7.0, 9.0], 500)
    val = assign_split(position, grade, 0.2, seed=1)
    assert val.sum() == 100
    for p in range(3):
        for g in (0.0, 9.0):
            cell = (position == p) & (grade == g)
            assert abs(val[cell].sum() - 0.2 * cell.sum()) < 1.0
    np.testing.assert_array_equal(val, assign_split(position, grade, 0.2, seed=1))
    assert not np.array_equal(val, assign_split(position, grade, 0.2, seed=2))
    # all singleton cells: still one val image, still some train
    single = assign_split(np.arange(5) % 3, np.arange(5, dtype=float), 0.2, seed=0)
    assert single.sum() == 1
    two = assign_split(np.array([0, 0]), np.array([1.0, 1.0]), 0.01, seed=0)
    assert two.sum() == 1


def test_tar_and_index_bytes_are_reproducible(synth_raw: Path, tiny_shards: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    convert_dataset(synth_raw, again, max_resolution=96, write_mode="jpg", workers=1, seed=0)
    first = json.loads((tiny_shards / F.MANIFEST).read_text())
    second = json.loads((again / F.MANIFEST).read_text())
    for name, entry in first["files"].items():
        if not name.endswith(".beton"):  # FFCV's page order depends on its writer processes
            assert second["files"][name] == entry, name
    assert first["samples"] == second["samples"]


def test_shard_set_errors_name_the_file(tiny_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="manifest.json is missing"):
        ShardSet(tmp_path)
    (tmp_path / F.MANIFEST).write_text("{not json")
    with pytest.raises(LoaderError, match=r"manifest.json is corrupt \(invalid JSON at line 1\)"):
        ShardSet(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in tiny_shards.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    shards = ShardSet(copy)
    last = shards.count("train") - 1
    tar = copy / "train-000000.tar"
    entry = parse_dali_index(copy / "train-000000.idx")[last]["jpg"]
    with open(tar, "r+b") as f:
        f.truncate(entry[0] + 10)
    with pytest.raises(LoaderError, match="train-000000.tar is truncated"):
        shards.read_image_bytes("train", last)
    (copy / "val-000000.idx").write_text("v1.2 3\njpg 1 2\n")
    with pytest.raises(LoaderError, match="val-000000.idx is corrupt"):
        ShardSet(copy).read_image_bytes("val", 0)
    with pytest.raises(LoaderError, match="unknown split 'test'"):
        shards.count("test")


def _temp_dirs(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.tmp-*"))


def test_killed_convert_leaves_no_out_and_rerun_completes(synth_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    code = ("import sys; from cornpipe.shards.convert import convert_dataset; "
            "convert_dataset(sys.argv[1], sys.argv[2], workers=1, max_resolution=64)")
    cmd = [sys.executable, "-c", code, str(synth_raw), str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        # kill -9 once the run has staged its first image (mid-way: decoding has begun)
        while time.monotonic() < deadline and proc.poll() is None:
            staged = [p for d in _temp_dirs(out) for p in (d / "_staging").glob("jpeg.bin")]
            if staged and staged[0].stat().st_size > 0:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "convert finished before it could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert len(_temp_dirs(out)) == 1  # the killed run's leftovers
    summary = convert_dataset(synth_raw, out, max_resolution=64, workers=1)
    assert summary.converted == 54
    assert _temp_dirs(out) == []
    assert ShardSet(out).count("train") + ShardSet(out).count("val") == 54


def test_ctrl_c_removes_the_temp_folder(synth_raw: Path, tmp_path: Path, monkeypatch) -> None:
    import cornpipe.shards.convert as convert_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "write_shards", interrupted)
    out = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        convert_dataset(synth_raw, out, max_resolution=32, workers=1)
    assert not out.exists() and _temp_dirs(out) == []


def test_smart_mode_stores_large_images_as_jpeg(synth_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "smart"
    # 64 px images are 12288 raw bytes: above a 10000-byte threshold -> JPEG, below the default -> raw
    convert_dataset(synth_raw, out, max_resolution=64, write_mode="smart", smart_threshold=10_000, workers=1)
    assert {BetonFile(out / "val.beton").image_record(r)[0] for r in range(11)} == {"jpg"}
    assert ShardSet(out).params["smart_threshold"] == 10_000
    out2 = tmp_path / "smart_default"
    convert_dataset(synth_raw, out2, max_resolution=64, write_mode="smart", workers=1)
    assert {BetonFile(out2 / "val.beton").image_record(r)[0] for r in range(11)} == {"raw"}


def test_a_live_runs_temp_folder_is_not_touched(synth_raw: Path, tmp_path: Path) -> None:
    import fcntl

    from cornpipe.errors import ConvertError

    out = tmp_path / "shards"
    live = tmp_path / f".shards.tmp-{os.getppid()}"  # a live process, as a live run's pid is
    live.mkdir()
    fd = os.open(live / ".lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held by "another run" (this process, through another fd)
    try:
        with pytest.raises(ConvertError, match=r"another convert is writing .*shards"):
            convert_dataset(synth_raw, out, max_resolution=32, workers=1)
        assert live.is_dir()
    finally:
        os.close(fd)
