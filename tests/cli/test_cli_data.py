"""The data commands as a user runs them: every bad input is repaired or rejected with its reason,
unusable layouts stop with one `Error:` line, and inspect/verify tell the truth about a shard set."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_run as run
from conftest import copy_with_a_damaged_tar, error_line
from PIL import Image

from cornpipe.shards import fields as F
from cornpipe.shards.shard_set import BetonFile, ShardSet, parse_dali_index


def jpeg_bytes(w: int = 48, h: int = 32, seed: int = 0, mode: str = "RGB", **save) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR).convert(mode)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92, **save)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def write_labels(folder: Path, rows: list[tuple[str, str]]) -> None:
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "grade"])
        w.writerows(rows)


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A survey holding one of every kind of bad input, converted once (raw mode, max 10000 px)."""
    import tifffile  # a declared dependency: remote-sensing TIFFs are read through it
    root = tmp_path_factory.mktemp("messy")
    src = root / "src"
    lower = src / "9l"
    lower.mkdir(parents=True)
    good = jpeg_bytes(seed=1)
    files = {
        "good.jpg": good,
        "zz_dup.jpg": good,
        "blatt_ü_δ.jpg": jpeg_bytes(seed=2),
        "empty.jpg": b"",
        "truncated.jpg": jpeg_bytes(seed=3)[:400],
        "no_eoi.jpg": jpeg_bytes(seed=4)[:-2],
        "text.jpg": b"this is not a picture\n",
        "png_inside.jpg": png_bytes(Image.new("RGB", (30, 20), (10, 200, 30))),
        "cmyk.jpg": jpeg_bytes(seed=5, mode="CMYK"),
        "gray.jpg": jpeg_bytes(seed=6, mode="L"),
        "bomb.png": png_bytes(Image.new("RGB", (120, 100), (0, 0, 255))),
        "offscale.jpg": jpeg_bytes(seed=7),
        "nograde.jpg": jpeg_bytes(seed=8),
        "unlisted.jpg": jpeg_bytes(seed=9),
        "notes.txt": b"field notes\n",
    }
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[:, 15:] = (0, 160, 0, 255)  # left half fully transparent (black), right half opaque green
    files["rgba.png"] = png_bytes(Image.fromarray(rgba, "RGBA"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    files["rotated.jpg"] = jpeg_bytes(w=40, h=24, seed=10, exif=exif.tobytes())
    for name, data in files.items():
        (lower / name).write_bytes(data)
    Image.fromarray(np.linspace(1000, 4000, 600).reshape(20, 30).astype(np.uint16)).save(lower / "depth16.tif")
    bands = (np.random.default_rng(0).random((20, 30, 5)) * 3000 + 500).astype(np.uint16)
    tifffile.imwrite(lower / "multiband.tif", bands, photometric="minisblack", planarconfig="contig")
    write_labels(lower, [
        ("good.jpg", "3"), ("zz_dup.jpg", "3"), ("blatt_ü_δ.jpg", "5"), ("empty.jpg", "0"),
        ("truncated.jpg", "0"), ("no_eoi.jpg", "0"), ("text.jpg", "0"), ("png_inside.jpg", "7"),
        ("cmyk.jpg", "9"), ("gray.jpg", "0"), ("bomb.png", "3"), ("offscale.jpg", "4"),
        ("nograde.jpg", ""), ("rgba.png", "5"), ("rotated.jpg", "7"), ("depth16.tif", "9"),
        ("multiband.tif", "3"), ("ghost.jpg", "5"), ("notes.txt", "0"),
    ])
    middle = src / "14m"
    for grade, name in (("3", "a.jpg"), ("9", "b.jpg"), ("x", "c.jpg")):
        (middle / grade).mkdir(parents=True)
        (middle / grade / name).write_bytes(jpeg_bytes(seed=20 + len(name) + int(grade == "9")))
    (middle / "loose.jpg").write_bytes(jpeg_bytes(seed=30))
    (src / "misc").mkdir()
    (src / "misc" / "stray.jpg").write_bytes(jpeg_bytes(seed=31))
    out = root / "out"
    result = run("convert", src, out, "--write-mode", "raw", "--max-pixels", 10000, "--workers", 2)
    assert result.exit_code == 0, result.output
    with open(out / "rejected.csv", newline="", encoding="utf-8") as f:
        rejected = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    return {"src": src, "out": out, "output": result.output, "rejected": rejected,
            "samples": {s["path"]: s for s in ShardSet(out).manifest["samples"]}}


EXPECTED_REJECTIONS = {
    "9l/empty.jpg": "empty file (0 bytes)",
    "9l/truncated.jpg": "truncated",
    "9l/no_eoi.jpg": "truncated JPEG (no end-of-image marker)",
    "9l/text.jpg": "not an image (content not recognised)",
    "9l/bomb.png": "120x100 = 12000 pixels, above the --max-pixels limit of 10000",
    "9l/offscale.jpg": "grade 4 is not on the grade scale 0,3,5,7,9",
    "9l/nograde.jpg": "missing grade",
    "9l/unlisted.jpg": "no row for this file in 9l/labels.csv",
    "9l/ghost.jpg": "listed in 9l/labels.csv (line 19) but the file does not exist",
    "9l/notes.txt": "not an image file (extension .txt)",
    "9l/zz_dup.jpg": "duplicate of 9l/good.jpg (same bytes)",
    "14m/x/c.jpg": "grade folder 'x' is not a number",
    "14m/loose.jpg": "no grade: 14m has no labels.csv and the file is not in a grade folder",
    "misc/stray.jpg": "unknown source folder 'misc'",
}
EXPECTED_CONVERTED = {
    "9l/good.jpg", "9l/blatt_ü_δ.jpg", "9l/png_inside.jpg", "9l/cmyk.jpg", "9l/gray.jpg", "9l/rgba.png",
    "9l/rotated.jpg", "9l/depth16.tif", "9l/multiband.tif", "14m/3/a.jpg", "14m/9/b.jpg",
}


def test_every_bad_input_is_rejected_with_its_reason(messy: dict) -> None:
    assert set(messy["rejected"]) == set(EXPECTED_REJECTIONS)
    for path, reason in EXPECTED_REJECTIONS.items():
        assert messy["rejected"][path].startswith(reason), (path, messy["rejected"][path])


def test_repairable_inputs_are_converted_and_accounted_for(messy: dict) -> None:
    assert set(messy["samples"]) == EXPECTED_CONVERTED
    n_conv, n_rej = len(EXPECTED_CONVERTED), len(EXPECTED_REJECTIONS)
    assert f"converted {n_conv} + rejected {n_rej} = found {n_conv + n_rej} in " in messy["output"]
    counts = ShardSet(messy["out"]).manifest["counts"]
    assert (counts["converted"], counts["rejected"], counts["found"]) == (n_conv, n_rej, n_conv + n_rej)
    s = messy["samples"]
    assert s["9l/cmyk.jpg"]["repairs"] == ["CMYK converted to RGB"]
    assert s["9l/gray.jpg"]["repairs"] == ["L converted to RGB"]
    assert s["9l/png_inside.jpg"]["repairs"] == []
    assert (s["14m/9/b.jpg"]["grade"], s["14m/9/b.jpg"]["position"], s["14m/9/b.jpg"]["stage"]) == (9, 1, 14)
    assert "5-band uint16 TIFF made 8-bit RGB" in s["9l/multiband.tif"]["repairs"]


def _pixels(messy: dict, path: str) -> np.ndarray:
    sample = messy["samples"][path]
    return BetonFile(messy["out"] / F.beton_name(sample["split"])).image(sample["row"])


def test_exif_orientation_is_applied(messy: dict) -> None:
    s = messy["samples"]["9l/rotated.jpg"]
    assert (s["width"], s["height"]) == (24, 40)  # stored 40x24, displayed upright 24x40
    assert s["repairs"] == ["EXIF orientation 6 applied"]


def test_transparency_is_composited_on_white(messy: dict) -> None:
    pixels = _pixels(messy, "9l/rgba.png")
    assert (pixels[:, :15] == 255).all()
    assert (pixels[:, 15:] == (0, 160, 0)).all()


def test_16_bit_tiff_is_stretched_to_8_bit(messy: dict) -> None:
    pixels = _pixels(messy, "9l/depth16.tif")
    assert pixels.min() == 0 and pixels.max() == 255
    assert (pixels[..., 0] == pixels[..., 1]).all()  # grey stays grey


def test_no_source_folders_is_one_error_line(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    (src / "holiday").mkdir(parents=True)
    (src / "holiday" / "a.jpg").write_bytes(jpeg_bytes())
    result = run("convert", src, tmp_path / "out")
    assert result.exit_code == 1
    assert error_line(result) == f"Error: no source folders (<stage><l|m|t>, e.g. 9l 14m 19t) found in {src}"
    assert not (tmp_path / "out").exists()


def test_labels_file_without_grade_column(tmp_path: Path) -> None:
    (tmp_path / "src" / "9l").mkdir(parents=True)
    (tmp_path / "src" / "9l" / "labels.csv").write_text("file,score\na.jpg,3\n")
    result = run("convert", tmp_path / "src", tmp_path / "out")
    assert result.exit_code == 1
    assert error_line(result) == "Error: 9l/labels.csv lacks column(s) grade (needs file,grade)"


def test_empty_split_and_bad_val_fraction(tmp_path: Path) -> None:
    (tmp_path / "src" / "9l").mkdir(parents=True)
    (tmp_path / "src" / "9l" / "a.jpg").write_bytes(jpeg_bytes())
    write_labels(tmp_path / "src" / "9l", [("a.jpg", "3")])
    result = run("convert", tmp_path / "src", tmp_path / "out", "--workers", 1)
    assert result.exit_code == 1
    assert error_line(result) == ("Error: the val split would be empty (1 images converted, --val-fraction 0.2); "
                                  "add images or change --val-fraction")
    result = run("convert", tmp_path / "src", tmp_path / "out", "--val-fraction", 0)
    assert error_line(result) == "Error: --val-fraction must be between 0 and 1 (exclusive), not 0.0"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_all_inputs_rejected(tmp_path: Path) -> None:
    (tmp_path / "src" / "9l").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "src" / "9l" / name).write_bytes(b"")
    write_labels(tmp_path / "src" / "9l", [("a.jpg", "3"), ("b.jpg", "5")])
    result = run("convert", tmp_path / "src", tmp_path / "out", "--workers", 1)
    assert error_line(result) == ("Error: no image could be converted: all 2 inputs were rejected "
                                  "(most common reason, 2x: empty file (0 bytes))")


def test_existing_out_needs_force(synth_raw: Path, tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(tiny_shards, out)  # an earlier shard set
    result = run("convert", synth_raw, out, "--max-resolution", 32, "--workers", 1)
    assert result.exit_code == 1
    assert error_line(result) == f"Error: {out} exists; use --force to replace it"
    result = run("convert", synth_raw, out, "--max-resolution", 32, "--workers", 1, "--force")
    assert result.exit_code == 0, result.output
    manifest = ShardSet(out).manifest
    assert manifest["params"]["max_resolution"] == 32 and manifest["counts"]["converted"] == 54


def test_grade_scale_option_validates_labels(synth_raw: Path, tmp_path: Path) -> None:
    result = run("convert", synth_raw, tmp_path / "out", "--grade-scale", "0-25", "--max-resolution", 32,
                 "--workers", 1, "--val-fraction", 0.5)
    assert result.exit_code == 0, result.output
    m = ShardSet(tmp_path / "out").manifest
    assert m["grade_scale"] == list(range(26))
    assert abs(m["splits"]["val"]["count"] - 27) <= 1
    result = run("convert", synth_raw, tmp_path / "out2", "--grade-scale", "1,2", "--workers", 1)
    assert error_line(result).startswith("Error: no image could be converted: all 54 inputs were rejected")


def test_manifest_csv_input(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    for i in range(6):
        (data / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(seed=40 + i))
    (tmp_path / "outside.jpg").write_bytes(jpeg_bytes(seed=50))
    (data / "manifest.csv").write_text(
        "path,position,grade,source,stage\n"
        "img/0.jpg,lower,0,,9\n"
        "img/1.jpg,m,3,,\n"
        "img/2.jpg,2,5,19t,\n"
        "img/3.jpg,top,7,fieldA,14\n"
        "img/4.jpg,upper,9,9l,\n"
        "img/5.jpg,sideways,9,,\n"
        "../outside.jpg,lower,0,,\n"
        "/etc/passwd.jpg,lower,0,,\n"
        "img/missing.jpg,lower,0,,\n"
        "img/0.jpg,lower,0,,9\n",
        encoding="utf-8")
    out = tmp_path / "out"
    result = run("convert", "--manifest", data / "manifest.csv", out, "--workers", 1, "--val-fraction", 0.25)
    assert result.exit_code == 0, result.output
    samples = {s["path"]: s for s in ShardSet(out).manifest["samples"]}
    assert {p: (s["position"], s["source"], s["stage"]) for p, s in samples.items()} == {
        # an empty source cell is unknown, never made up from the stage and the position
        "img/0.jpg": (0, "unknown", 9), "img/1.jpg": (1, "unknown", None), "img/2.jpg": (2, "19t", 19),
        "img/3.jpg": (2, "fieldA", 14)}
    with open(out / "rejected.csv", newline="", encoding="utf-8") as f:
        rejected = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    assert rejected == {
        "img/4.jpg": "source 9l is a lower source but position is upper",
        "img/5.jpg": "unknown position 'sideways' (use lower/middle/upper, l/m/t or 0/1/2)",
        "../outside.jpg": "path escapes the manifest's folder (absolute or '..')",
        "/etc/passwd.jpg": "path escapes the manifest's folder (absolute or '..')",
        "img/missing.jpg": "listed in manifest.csv (line 10) but the file does not exist",
        "img/0.jpg": "listed again in manifest.csv (line 11; first on line 2)",
    }
    assert "converted 4 + rejected 6 = found 10" in result.output


def test_inspect_table_and_json(tiny_shards: Path) -> None:
    result = run("inspect", tiny_shards)
    assert result.exit_code == 0, result.output
    assert "images per split x source x position x grade" in result.output
    assert "found 54, converted 54, rejected 0" in result.output
    result = run("inspect", tiny_shards, "--json")
    info = json.loads(result.output)
    assert sum(c["count"] for c in info["cells"]) == 54
    assert info["splits"] == {"train": 43, "val": 11}
    assert info["image_sizes"]["train"]["width"]["max"] == 96
    assert info["bytes"]["total"] == sum(p.stat().st_size for p in tiny_shards.iterdir())
    result = run("inspect", tiny_shards.parent)
    assert error_line(result) == f"Error: {tiny_shards.parent / 'manifest.json'} is missing: " \
                                 f"{tiny_shards.parent} is not a shard set (run cornpipe convert)"


def test_verify_intact_and_damaged(tiny_shards: Path, tmp_path: Path) -> None:
    result = run("verify", tiny_shards)
    assert result.exit_code == 0, result.output
    assert "decoded 54 images from .beton and 54 from tar shards" in result.output

    copy = tmp_path / "copy"
    tar = copy_with_a_damaged_tar(tiny_shards, copy)
    result = run("verify", copy)
    assert result.exit_code == 1
    assert error_line(result) == f"Error: {tar} is damaged (sha256 mismatch)"

    shutil.copy(tiny_shards / tar.name, tar)
    (copy / "val-000000.idx").unlink()
    result = run("verify", copy)
    assert error_line(result) == f"Error: {copy / 'val-000000.idx'} is missing"


def test_verify_decodes_images_not_just_hashes(tiny_shards: Path, tmp_path: Path) -> None:
    """Damage recorded in the manifest (e.g. a bad disk at write time) is still caught by decoding."""
    from cornpipe.shards.manifest import sha256_file, write_manifest_hash

    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    tar = copy / "val-000000.tar"
    offset, size = parse_dali_index(copy / "val-000000.idx")[0]["jpg"]
    with open(tar, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * 64)  # wipe the JPEG header
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][tar.name]["sha256"] = sha256_file(tar)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    write_manifest_hash(copy)  # the bad write happened before the manifest was hashed
    result = run("verify", copy)
    assert result.exit_code == 1
    assert error_line(result).startswith(f"Error: {tar} is damaged (image of sample ")
