"""`python -m cornpipe.bench.recipes`: recipes over the same cv folds, one table with paired differences.

A bad recipes file is one `Error:` line before any training; a run of two tiny recipes gives a table whose
paired difference is the mean of the per-run macro-F1 differences, and per-origin accuracy from the
manifest's metadata column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, shards_from_csv

from cornpipe.bench.recipes import group_accuracy, main, paired

BASE = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {**TINY, "bootstrap": 0, "epochs": 1}.items())


def _recipes(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipes.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "words"), [
    ("[base]\nepochs = 1\n", "has no [[recipe]]"),
    ("[base]\n[[recipe]]\nname = \"a\"\nlr_max = 3\n", "unknown key(s)"),
    ("[base]\n[[recipe]]\nname = \"a\"\n[[recipe]]\nname = \"a\"\n", "recipe names repeat"),
    ("[base]\nfolds = 5\n[[recipe]]\nname = \"a\"\n", "set by the benchmark"),
    ("[base]\ninit_weights = \"$NO_SUCH_VARIABLE_HERE\"\n[[recipe]]\nname = \"a\"\n", "not set"),
])
def test_a_bad_recipes_file_is_one_error_line_before_any_training(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, words: str) -> None:
    code = main([str(tmp_path / "missing-shards"), "--out", str(tmp_path / "out"),
                 "--recipes", str(_recipes(tmp_path, text))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("Error: ") and words in err[0], err
    assert not (tmp_path / "out").exists()


def test_paired_interval_and_group_accuracy_are_the_textbook_ones() -> None:
    p = paired([0.1, 0.3])  # mean 0.2, sd 0.1414, t(1) = 12.706
    assert p["mean"] == pytest.approx(0.2) and p["ci95"] == pytest.approx([0.2 - 1.2706, 0.2 + 1.2706], abs=1e-3)
    rows = [{"sample_id": str(i), "position_true": "a", "position_pred": "a" if i % 4 else "b"} for i in range(20)]
    got = group_accuracy(rows, {i: "field" if i < 8 else "lab" for i in range(20)})
    assert got["field"]["n"] == 8 and got["field"]["accuracy"] == pytest.approx(6 / 8)
    assert got["field"]["ci95"] is None  # under 10 samples: no interval
    assert got["lab"]["accuracy"] == pytest.approx(9 / 12) and got["lab"]["ci95"][0] <= 0.75 <= got["lab"]["ci95"][1]


def test_two_recipes_on_the_same_folds_give_one_table_with_their_paired_difference(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [f"img{i}.jpg,{('lower', 'middle', 'upper')[i % 3]},5,{'field' if i % 5 == 0 else 'lab'}"
            for i in range(36)]
    shards = shards_from_csv(raw, "path,position,grade,origin", rows)
    recipes = _recipes(tmp_path, f"[base]\n{BASE}\n[[recipe]]\nname = \"plain\"\n"
                                 "[[recipe]]\nname = \"cosine\"\nschedule = \"cosine\"\njitter = 0.0\ntta = true\n")
    out = tmp_path / "bench"
    assert main([str(shards), "--out", str(out), "--recipes", str(recipes), "--folds", "2", "--seeds", "0",
                 "--metadata", "origin", "--against", "cosine"]) == 0
    results = {r["name"]: r for r in json.loads((out / "recipes.json").read_text())["results"]}
    assert set(results) == {"plain", "cosine"}
    for name in results:  # each recipe is a real cv: its folder, its config, its runs
        assert json.loads((out / name / "fold0-seed0" / "config.json").read_text())["fold"] == 0
    assert json.loads((out / "cosine" / "fold1-seed0" / "config.json").read_text())["schedule"] == "cosine"
    plain, cosine = results["plain"]["run_f1"], results["cosine"]["run_f1"]
    assert sorted(plain) == sorted(cosine) == ["fold0-seed0", "fold1-seed0"]
    expected = sum(cosine[k] - plain[k] for k in plain) / 2
    assert results["cosine"]["vs_baseline"]["mean"] == pytest.approx(expected)
    assert results["plain"]["vs_against"]["mean"] == pytest.approx(-expected)
    assert set(results["cosine"]["by_origin"]) == {"field", "lab"}
    assert results["cosine"]["by_origin"]["field"]["n"] + results["cosine"]["by_origin"]["lab"]["n"] == 36
    field = {name: results[name]["by_origin"]["field"] for name in results}  # same photos: a paired difference
    assert field["cosine"]["delta"]["mean"] == pytest.approx(field["cosine"]["accuracy"] - field["plain"]["accuracy"])
    assert sorted(results["cosine"]["tta"]["run_f1"]) == ["fold0-seed0", "fold1-seed0"]
    table = (out / "recipes.md").read_text()
    assert "cosine + TTA" in table and "origin=field accuracy" in table


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs" / "benchmarks").glob("*.toml")),
                         ids=lambda p: p.name)
def test_the_benchmark_recipe_files_of_docs_recipes_are_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cornpipe.bench.recipes import load_recipes

    monkeypatch.setenv("LITE0", "efficientnet-lite0.pth")
    base, recipes = load_recipes(path)
    assert len(recipes) >= 2 and sum(r["baseline"] for r in recipes) == 1
    assert path.name in (Path(__file__).parents[2] / "docs" / "recipes.md").read_text()
