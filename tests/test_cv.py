"""Cross-validation: folds are stratified, disjoint and covering; a held-out group never trains; any
backend reads any set of sample ids; the summary's numbers are the mean/sd of the per-fold numbers;
a killed `cornpipe cv` skips its finished folds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import needs_library

from cornpipe.cli import cli
from cornpipe.errors import ConfigError, LoaderError
from cornpipe.loaders import make_loader
from cornpipe.runs.config import TrainConfig
from cornpipe.runs.cv import fold_ids, stratified_folds, summarize_runs
from cornpipe.shards.shard_set import ShardSet


def samples(shards: Path) -> list[dict]:
    return ShardSet(shards).manifest["samples"]


def test_stratified_folds_are_disjoint_covering_and_balanced_per_cell(tiny_shards: Path) -> None:
    rows = samples(tiny_shards)
    all_ids = sorted(s["id"] for s in rows)
    k = 3
    vals = []
    for fold in range(k):
        cfg = TrainConfig(shards=str(tiny_shards), out="x", folds=k, fold=fold)
        train, val, _name = fold_ids(rows, cfg)
        assert not set(train) & set(val) and sorted(train + val) == all_ids
        vals.append(set(val))
    assert set().union(*vals) == set(all_ids) and sum(len(v) for v in vals) == len(all_ids)
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    cell = {s["id"]: (s["position"], s["grade"]) for s in rows}
    for c in set(cell.values()):  # every position x grade cell is spread evenly over the folds
        per_fold = [sum(cell[i] == c for i in v) for v in vals]
        assert max(per_fold) - min(per_fold) <= 1, (c, per_fold)
    # the assignment is a function of the seed
    cells = [cell[i] for i in all_ids]
    assert (stratified_folds(cells, k, 1) == stratified_folds(cells, k, 1)).all()
    assert not (stratified_folds(cells, k, 1) == stratified_folds(cells, k, 2)).all()


@pytest.mark.parametrize("group", ["stage", "source"])
def test_a_held_out_group_is_never_trained_on(group: str, tiny_shards: Path) -> None:
    rows = samples(tiny_shards)
    of = {s["id"]: s[group] for s in rows}
    names = sorted(set(of.values()))
    seen = []
    for fold in range(len(names)):
        train, val, name = fold_ids(rows, TrainConfig(shards=str(tiny_shards), out="x", fold_group=group, fold=fold))
        assert {of[i] for i in val} == {names[fold]} and name == f"{group} {names[fold]}"
        assert names[fold] not in {of[i] for i in train}
        seen.append(names[fold])
    assert seen == names
    with pytest.raises(ConfigError, match="fold 99 does not exist"):
        fold_ids(rows, TrainConfig(shards=str(tiny_shards), out="x", fold_group=group, fold=99))


@pytest.mark.parametrize("backend", ["torch", "resident", "ffcv", "dali"])
def test_any_backend_reads_a_subset_of_sample_ids_from_both_splits(backend: str, tiny_shards: Path) -> None:
    needs_library(backend)
    rows = samples(tiny_shards)
    pick = [s for s in rows if s["split"] == "val"][:3] + [s for s in rows if s["split"] == "train"][:4]
    ids = [s["id"] for s in pick]
    kwargs = dict(backend=backend, batch_size=4, image_size=32, device="cpu", workers=0, dtype=torch.float32,
                  oversample="none", shuffle=False, sample_ids=ids)
    if backend == "ffcv":  # not yet: two .beton files, one per split
        with pytest.raises(LoaderError, match="cannot read a subset"):
            make_loader(tiny_shards, "val", **kwargs)
        return
    with make_loader(tiny_shards, "val", **kwargs) as loader:
        batches = list(loader)
    got = torch.cat([b.sample_id for b in batches]).tolist()
    assert got == ids
    with make_loader(tiny_shards, "val", **{**kwargs, "backend": "torch"}) as reference:  # the same pictures
        expected = torch.cat([b.images for b in reference])
    assert (torch.cat([b.images for b in batches]) - expected).abs().mean() < 0.05  # 0.003 measured; a wrong image ~0.5
    labels = {s["id"]: (s["position"], float(s["grade"])) for s in pick}
    for b in batches:
        assert b.images.shape[1:] == (3, 32, 32)
        for i, p, g in zip(b.sample_id.tolist(), b.position.tolist(), b.grade.tolist(), strict=True):
            assert labels[i] == (p, g)


def test_summary_is_the_mean_and_sd_of_the_per_fold_numbers() -> None:
    rng = np.random.default_rng(0)
    rows, per_fold = [], []
    for fold in range(4):
        accs = rng.uniform(0.3, 0.9, size=2)  # two seeds per fold
        per_fold.append(accs.mean())
        for seed, acc in enumerate(accs):
            rows.append({"fold": fold, "seed": seed, "val": {
                "position_accuracy": float(acc), "position_recall": {"a": float(acc), "b": None},
                "confusion": [[fold, 1], [0, seed]]}})
    summary = summarize_runs(rows, ["a", "b"])
    m = summary["metrics"]["position_accuracy"]
    assert m["per_fold"] == pytest.approx(per_fold)
    assert m["mean"] == pytest.approx(np.mean(per_fold)) and m["sd"] == pytest.approx(np.std(per_fold, ddof=1))
    half = 3.182446305284263 * np.std(per_fold, ddof=1) / 2  # t(0.975, 3) * sd / sqrt(4)
    assert m["ci95"] == pytest.approx([np.mean(per_fold) - half, np.mean(per_fold) + half])
    assert summary["position_recall"]["a"]["mean"] == pytest.approx(np.mean(per_fold))
    assert summary["position_recall"]["b"]["n"] == 0
    assert summary["pooled_confusion"] == [[12, 8], [0, 4]]


@pytest.mark.slow
def test_cv_command_summarises_and_a_killed_cv_skips_finished_folds(tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    args = ["cv", str(tiny_shards), "--out", str(out), "--folds", "2", "--model", "resnet_plus_tiny",
            "--image-size", "32", "--batch-size", "16", "--max-batches", "2", "--workers", "0", "--epochs", "2",
            "--device", "cpu", "--bootstrap", "0"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    summary = json.loads((out / "cv.json").read_text())
    assert [r["run"] for r in summary["rows"]] == ["fold0-seed0", "fold1-seed0"]
    accs = [r["position_accuracy"] for r in summary["rows"]]
    acc = summary["metrics"]["position_accuracy"]
    assert acc["mean"] == pytest.approx(np.mean(accs)) and acc["sd"] == pytest.approx(np.std(accs, ddof=1))
    # every sample validated once: the pooled out-of-fold confusion counts the whole set
    assert np.array(summary["pooled_confusion"]).sum() == sum(r["n_val"] for r in summary["rows"]) == 54
    assert (out / "cv.md").read_text().startswith("# Cross-validation: 2 folds")
    assert (out / "cv_confusion.png").stat().st_size > 0
    # "kill" the second fold after its first epoch: keep epoch 1 only, as a killed run leaves it
    run = out / "fold1-seed0"
    (run / "cv_result.json").unlink()
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n")
    torch.save({**state, "epoch": 1}, run / "last.pt")  # pretend: last.pt of epoch 1
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert "fold0-seed0: finished earlier, skipped" in again.output
    assert "fold1-seed0: resuming" in again.output
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_cv_refuses_options_it_sets_itself(tiny_shards: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["cv", str(tiny_shards), "--out", str(tmp_path / "cv"), "--nproc", "2"])
    assert result.exit_code == 1 and "Error: cornpipe cv sets --nproc itself" in result.output
    result = CliRunner().invoke(cli, ["train", str(tiny_shards), "--out", str(tmp_path / "r"), "--seeds", "0,x"])
    assert result.exit_code == 1 and "Error: --seeds must be distinct" in result.output
