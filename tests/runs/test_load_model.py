"""`from cornpipe import load_model`: predictions as rows in Python, the same for a path, a PIL image and an
array, and the rows `cornpipe predict` writes (one naming of prediction columns)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_run
from PIL import Image

POSITIONS = ["lower", "middle", "upper"]
COLUMNS = ["path", "position_pred", "prob_lower", "prob_middle", "prob_upper", "grade_pred", "grade_pred_level",
           "error"]


@pytest.fixture(scope="module")
def run(trained_run: Path) -> Path:
    return trained_run


@pytest.fixture(scope="module")
def images(synth_raw: Path) -> list[Path]:
    return sorted(synth_raw.rglob("*.jpg"))[:5]


def test_path_pil_image_and_array_give_the_same_row(run: Path, images: list[Path]) -> None:
    from cornpipe import load_model

    model = load_model(run, device="cpu")
    with Image.open(images[0]) as opened:
        opened.load()
        pil = opened.copy()
    array = np.asarray(pil.convert("RGB"), dtype=np.uint8)
    rows = model.predict([images[0], pil, array])
    assert [list(r) for r in rows] == [COLUMNS] * 3
    assert rows[0]["path"] == str(images[0]) and rows[1]["path"] is None and rows[2]["path"] is None
    first = {k: v for k, v in rows[0].items() if k != "path"}
    for row in rows[1:]:
        assert {k: v for k, v in row.items() if k != "path"} == first
    assert first["error"] is None and first["position_pred"] in POSITIONS
    assert sum(first[f"prob_{p}"] for p in POSITIONS) == pytest.approx(1.0, abs=1e-5)
    assert first["position_pred"] == max(POSITIONS, key=lambda p: first[f"prob_{p}"])
    assert model.predict(images[0])[0] == rows[0]  # one image alone: a list of one row


def test_tta_and_batch_size_are_options(run: Path, images: list[Path]) -> None:
    from cornpipe import load_model

    model = load_model(run / "best.pt", device="cpu", batch_size=2)
    plain, tta = model.predict(images), model.predict(images, tta=True)
    assert [r["path"] for r in plain] == [str(p) for p in images]
    assert [r["prob_lower"] for r in plain] != [r["prob_lower"] for r in tta]
    one_batch = model.predict(images, batch_size=5)
    for a, b in zip(plain, one_batch, strict=True):
        assert a["position_pred"] == b["position_pred"]
        assert [a[f"prob_{p}"] for p in POSITIONS] == pytest.approx([b[f"prob_{p}"] for p in POSITIONS], abs=1e-5)


def test_unreadable_file_is_an_error_row_and_bad_array_an_error(run: Path, images: list[Path],
                                                                tmp_path: Path) -> None:
    from cornpipe import load_model
    from cornpipe.errors import CornpipeError

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    model = load_model(run, device="cpu")
    rows = model.predict([broken, images[0]])
    assert rows[0]["error"] and rows[0]["position_pred"] is None and rows[0]["prob_lower"] is None
    assert rows[1]["error"] is None
    with pytest.raises(CornpipeError, match="HxWx3 uint8"):
        model.predict([np.zeros((8, 8), dtype=np.uint8)])


def test_cli_predict_csv_equals_the_api_rows(run: Path, images: list[Path], tmp_path: Path) -> None:
    from cornpipe import load_model

    out = tmp_path / "preds.csv"
    result = cli_run("predict", run, *images, "--out", out, "--device", "cpu", "--tta")  # a run folder
    assert result.exit_code == 0, result.output
    with out.open(newline="") as f:
        written = list(csv.DictReader(f))
    expected = load_model(run, device="cpu", tta=True).predict(images)
    assert [list(r) for r in written] == [COLUMNS] * len(images)
    for text, row in zip(written, expected, strict=True):
        assert text["path"] == row["path"] and text["position_pred"] == row["position_pred"]
        assert text["error"] == ""
        for key in ("prob_lower", "prob_middle", "prob_upper", "grade_pred", "grade_pred_level"):
            assert float(np.float32(text[key])) == row[key], key  # the text reads back as the API float32


def test_importing_cornpipe_stays_light() -> None:
    code = ("import sys, json, cornpipe; loaded = 'torch' in sys.modules; f = cornpipe.load_model; "
            "print(json.dumps([loaded, 'torch' in sys.modules, f.__module__]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [False, True, "cornpipe.predict"]
