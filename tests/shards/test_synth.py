"""`cornpipe synth`: the built-in dataset's layout, determinism, options, and that its labels are learnable."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import cornpipe.shards.synth as synth_module
from cornpipe.errors import CornpipeError
from cornpipe.shards.fields import POSITION_CODES, SOURCES
from cornpipe.shards.synth import make_synthetic, parse_grade_scale, parse_position_weights


def run(*args: object):
    from cornpipe.cli import cli

    return CliRunner().invoke(cli, ["synth", *map(str, args)])


def read_labels(folder: Path) -> list[dict[str, str]]:
    with open(folder / "labels.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["file", "grade"]
        return list(reader)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_labels_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    summary = make_synthetic(out, per_source=4, image_size=48, seed=0, workers=1)

    assert sorted(p.name for p in out.iterdir()) == sorted(SOURCES)
    total_bytes = 0
    for source in SOURCES:
        rows = read_labels(out / source)
        assert len(rows) == 4
        assert sorted(p.name for p in (out / source).iterdir()) == sorted([r["file"] for r in rows] + ["labels.csv"])
        for row in rows:
            assert int(row["grade"]) in (0, 3, 5, 7, 9)
            with Image.open(out / source / row["file"]) as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (48, 48))
                image.load()
            total_bytes += (out / source / row["file"]).stat().st_size
    assert summary["images"] == 36
    assert summary["sources"] == {s: 4 for s in SOURCES}
    assert summary["positions"] == {"lower": 12, "middle": 12, "upper": 12}
    assert sum(summary["grades"].values()) == 36 and set(summary["grades"]) == {0, 3, 5, 7, 9}
    assert summary["bytes"] == total_bytes
    assert not list(tmp_path.glob(".raw.synth-*")), "the staging folder must be gone"


def test_photo_like_file_sizes_at_512px(tmp_path: Path) -> None:
    summary = make_synthetic(tmp_path / "raw", per_source=1, image_size=512, seed=0, workers=1)
    mean_kb = summary["bytes"] / summary["images"] / 1024
    assert 15 <= mean_kb <= 150, mean_kb


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_synthetic(tmp_path / "a", per_source=3, image_size=40, seed=7, workers=1)
    monkeypatch.setattr(synth_module, "_POOL_MIN_PIXELS", 0)  # force the process pool for tiny images
    make_synthetic(tmp_path / "b", per_source=3, image_size=40, seed=7, workers=2)
    make_synthetic(tmp_path / "c", per_source=3, image_size=40, seed=8, workers=1)
    a, b, c = (tree_bytes(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[name] != c[name] for name in a if name.endswith(".jpg"))


def test_grade_scale_0_to_25(tmp_path: Path) -> None:
    result = run(tmp_path / "raw", "--per-source", 8, "--image-size", 40, "--grade-scale", "0-25",
                 "--workers", 1)
    assert result.exit_code == 0, result.output
    grades = [int(r["grade"]) for s in SOURCES for r in read_labels(tmp_path / "raw" / s)]
    assert len(grades) == 72 and set(grades) <= set(range(26))
    assert len(set(grades)) >= 15  # drawn from the whole range, not a few values


@pytest.mark.parametrize("weights", [(0.6, 0.3, 0.1), (6, 3, 1)])
def test_position_weights_give_the_requested_imbalance(tmp_path: Path, weights: tuple[float, ...]) -> None:
    summary = make_synthetic(tmp_path / "raw", per_source=10, image_size=32, position_weights=weights, workers=1)
    expected = dict(zip(POSITION_CODES, (18, 9, 3), strict=True))
    for source in SOURCES:
        assert len(read_labels(tmp_path / "raw" / source)) == expected[source[-1]]
    assert summary["positions"] == {"lower": 54, "middle": 27, "upper": 9}
    assert summary["images"] == 90  # about per_source * 9


def test_zero_position_weight_writes_no_folder_for_that_position(tmp_path: Path) -> None:
    result = run(tmp_path / "raw", "--per-source", 2, "--image-size", 32, "--position-weights", "1,1,0")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(s for s in SOURCES if s[-1] != "t")
    assert "lower 9, middle 9, upper 0" in result.output


def test_cli_summary_line(tmp_path: Path) -> None:
    result = run(tmp_path / "raw", "--per-source", 2, "--image-size", 32, "--seed", 3, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert re.fullmatch(
        rf"wrote 18 images in 9 sources \(lower 6, middle 6, upper 6\) to {re.escape(str(tmp_path / 'raw'))}: "
        r"\d+\.\d\d MB in \d+\.\d s\n",
        result.output,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0,3,5,7,9", (0, 3, 5, 7, 9)), (" 0, 1 ,2 ", (0, 1, 2)), ("0-25", tuple(range(26))), ("1-9", tuple(range(1, 10)))],
)
def test_parse_grade_scale(text: str, expected: tuple[int, ...]) -> None:
    assert parse_grade_scale(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0,5,3", "grade scale '0,5,3' must be in ascending order"),
        ("0,3,3,5", "grade scale '0,3,3,5': grade 3 appears twice"),
        ("-1,0,3", "grade scale '-1,0,3': grade -1 is negative"),
        ("0,a,9", "grade scale '0,a,9': 'a' is not a whole number (give e.g. 0,3,5,7,9 or 0-25)"),
        ("0,2.5", "grade scale '0,2.5': '2.5' is not a whole number (give e.g. 0,3,5,7,9 or 0-25)"),
        ("9-0", "grade scale range '9-0' must go up (e.g. 0-25)"),
        ("5", "grade scale '5' needs at least two grades"),
        ("", "grade scale is empty (give e.g. 0,3,5,7,9 or 0-25)"),
    ],
)
def test_bad_grade_scale_is_a_one_line_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(CornpipeError, match=f"^{re.escape(message)}$"):
        parse_grade_scale(text)
    result = run(tmp_path / "raw", "--grade-scale", text)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == f"Error: Invalid value for '--grade-scale': {message}"
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.6,0.4", "position weights '0.6,0.4': need 3 numbers for lower/middle/upper, e.g. 0.6,0.3,0.1"),
        ("0.6,-0.3,0.1", "position weights '0.6,-0.3,0.1': weights must be finite and >= 0"),
        ("0,0,0", "position weights '0,0,0': at least one weight must be > 0"),
        ("a,1,1", "position weights 'a,1,1': 'a' is not a number"),
    ],
)
def test_bad_position_weights(tmp_path: Path, text: str, message: str) -> None:
    result = run(tmp_path / "raw", "--position-weights", text)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == f"Error: Invalid value for '--position-weights': {message}"


def test_parse_position_weights_normalises() -> None:
    assert parse_position_weights("2,1,1") == pytest.approx((0.5, 0.25, 0.25))


def test_existing_out_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run(out, "--per-source", 1, "--image-size", 32)
    assert result.exit_code == 1
    assert result.output == f"Error: {out} exists and is not empty (use --force to replace it)\n"
    assert (out / "keep.txt").read_text() == "mine"

    result = run(out, "--per-source", 1, "--image-size", 32, "--force")  # not a synth output: kept
    assert result.exit_code == 1
    assert (out / "keep.txt").read_text() == "mine"

    (out / "keep.txt").unlink()
    assert run(out, "--per-source", 2, "--image-size", 32).exit_code == 0
    result = run(out, "--per-source", 1, "--image-size", 32, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(SOURCES)  # replaced, not merged
    assert len(list((out / "9l").glob("*.jpg"))) == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(empty, "--per-source", 1, "--image-size", 32).exit_code == 0


def test_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    out.write_text("not a folder")
    with pytest.raises(CornpipeError, match="exists and is not a folder"):
        make_synthetic(out, per_source=1, image_size=32, force=True)


# ---------------------------------------------------------------------------------------------
# the signal: simple models on colour histograms learn both labels from held-out, cropped images


def _random_crop_flip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The training augmentation's geometry: random resized crop (35-100 % of the area) and flips."""
    w, h = image.size
    area = rng.uniform(0.35, 1.0) * w * h
    ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw, ch = min(w, round((area * ratio) ** 0.5)), min(h, round((area / ratio) ** 0.5))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = image.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image


def _hsv_histogram(image: Image.Image) -> np.ndarray:
    hsv = np.asarray(image.convert("HSV").resize((32, 32)), dtype=np.float32).reshape(-1, 3)
    hist, _ = np.histogramdd(hsv, bins=(16, 3, 3), range=((0, 256), (0, 256), (0, 256)))
    return hist.ravel() / len(hsv)


@pytest.fixture(scope="module")
def learn_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, ...]:
    out = tmp_path_factory.mktemp("learn") / "raw"
    make_synthetic(out, per_source=20, image_size=96, seed=1, workers=1)  # 180 images
    rng = np.random.default_rng(0)
    features, cropped, positions, grades = [], [], [], []
    for source in SOURCES:
        for row in read_labels(out / source):
            with Image.open(out / source / row["file"]) as image:
                image = image.convert("RGB")
            features.append(_hsv_histogram(image))
            cropped.append(_hsv_histogram(_random_crop_flip(image, rng)))
            positions.append(POSITION_CODES.index(source[-1]))
            grades.append(int(row["grade"]))
    order = rng.permutation(len(positions))
    train, test = order[:120], order[120:]
    return (np.array(features)[train], np.array(cropped)[test], np.array(positions)[train],
            np.array(positions)[test], np.array(grades)[train], np.array(grades)[test])


def test_position_is_learnable_from_colour(learn_set: tuple[np.ndarray, ...]) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, p_train, p_test, _, _ = learn_set
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
    accuracy = (model.fit(x_train, p_train).predict(x_test) == p_test).mean()
    assert accuracy >= 0.9, accuracy
    # control: the same model on shuffled labels learns nothing, so a broken label pipeline shows
    shuffled = np.random.default_rng(1).permutation(p_train)
    assert (model.fit(x_train, shuffled).predict(x_test) == p_test).mean() < 0.6


def test_grade_is_learnable_from_lesions(learn_set: tuple[np.ndarray, ...]) -> None:
    from scipy.stats import spearmanr
    from sklearn.ensemble import ExtraTreesRegressor

    x_train, x_test, _, _, g_train, g_test = learn_set
    model = ExtraTreesRegressor(n_estimators=200, min_samples_leaf=2, random_state=0)
    predicted = model.fit(x_train, g_train).predict(x_test)
    assert spearmanr(predicted, g_test).statistic >= 0.8
    assert np.abs(predicted - g_test).mean() <= 1.5  # on the 0,3,5,7,9 scale; guessing the mean gives ~3
