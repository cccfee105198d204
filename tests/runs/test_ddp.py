"""Distributed data parallel on the CPU (gloo): torchrun ranks read disjoint shards, validation covers the
split once and equals a single process's, rank 0 alone writes the run, a resumed group ends like an
uninterrupted one, and a failing rank takes the group down with a one-line error naming it.

The multi-process tests launch `cornpipe train --nproc 2` or `cornpipe cv --nproc 2` (torchrun
--standalone underneath) and are marked slow; each keeps to resnet_plus_tiny at 32 px, two batches an
epoch, no loader workers.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, assert_same_weights, cli_options, needs_library, records, without_timing

from cornpipe.loaders import make_loader
from cornpipe.loaders.base import IMAGENET
from cornpipe.runs.evaluation import evaluate_checkpoint
from cornpipe.shards.shard_set import ShardSet

BACKENDS = ("torch", "resident", "ffcv", "dali")
# plateau: the resume test stands in for a kill by a 2-epoch run continued to 3, and a cosine schedule's
# curve depends on --epochs (a run extended by --resume follows the longer curve from there on)
TINY_ARGS = cli_options({**TINY, "batch_size": 8, "max_batches": 2, "schedule": "plateau"})


def cornpipe(*args: object, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cornpipe", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=False)


def rank_ids(shards: Path, backend: str, split: str, world: int, **fields) -> list[np.ndarray]:
    """The sample ids each rank's loader yields in epoch 1."""
    out = []
    fields.setdefault("oversample", "none")
    for rank in range(world):
        loader = make_loader(shards, split, backend=backend, batch_size=4, image_size=32, device="cpu",
                             workers=0, rank=rank, world_size=world, dtype=torch.float32, normalization=IMAGENET,
                             **fields)
        try:
            loader.set_epoch(1)
            out.append(np.concatenate([b.sample_id.numpy() for b in loader]))
        finally:
            loader.close()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_read_disjoint_shards_that_cover_the_split(backend: str, tiny_shards: Path) -> None:
    needs_library(backend)
    shards = ShardSet(tiny_shards)
    # validation: disjoint, unpadded, every image exactly once across the ranks
    val = rank_ids(tiny_shards, backend, "val", 2, oversample="none", shuffle=False)
    assert not set(val[0]) & set(val[1])
    assert sorted(np.concatenate(val).tolist()) == sorted(shards.labels("val")[2].tolist())
    # training (shuffled, even): disjoint, equal lengths, at most world_size - 1 images left out
    train = rank_ids(tiny_shards, backend, "train", 3, oversample="none", even=True)
    assert len({len(ids) for ids in train}) == 1
    joined = np.concatenate(train)
    assert len(set(joined.tolist())) == len(joined)
    assert set(joined.tolist()) <= set(shards.labels("train")[2].tolist())
    assert shards.count("train") - len(joined) < 3


@pytest.fixture(scope="module")
def ddp_run(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three epochs on two CPU ranks; read-only for the tests below."""
    run = tmp_path_factory.mktemp("ddp") / "straight"
    result = cornpipe("train", tiny_shards, "--out", run, "--nproc", "2", "--epochs", "3", "--ema",
                      "--drop-path", "0.1", *TINY_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.slow
def test_two_ranks_write_one_run_that_a_single_process_reproduces(ddp_run: Path) -> None:
    assert sorted(p.name for p in ddp_run.iterdir() if not p.name.startswith(".")) == sorted(
        ["best.pt", "calibration.png", "cam_panel.png", "config.json", "confusion_matrix.png", "curves.png",
         "grade_confusion.png", "last.pt", "metrics.jsonl", "report.html", "report.md", "val_predictions.csv"])
    lines = records(ddp_run)
    assert [r["epoch"] for r in lines] == [1, 2, 3]  # rank 0 alone writes: no line twice
    assert json.loads((ddp_run / "config.json").read_text())["data"]["world_size"] == 2
    # both ranks trained: the train metrics cover 2 ranks x 2 batches x 8 images
    assert all(r["train"]["n_samples"] == 32 for r in lines)
    state = torch.load(ddp_run / "best.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in (*state["model"], *state["ema"]["module"]))
    # validation covered the whole split once; a single process's evaluation of best.pt agrees exactly
    best = next(r for r in reversed(lines) if r["best"])["val"]
    single = evaluate_checkpoint(ddp_run / "best.pt")
    assert best["n_samples"] == single["n_samples"] == ShardSet(state["data"]["shards"]).count("val")
    for key in ("position_accuracy", "position_macro_f1", "grade_mae", "grade_within_tol", "grade_accuracy",
                "confusion", "position_recall", "ci"):
        assert best[key] == single[key], key
    for key in ("loss", "position_loss", "grade_loss"):
        assert best[key] == pytest.approx(single[key], rel=1e-5)
    # the best epoch's per-sample predictions: gathered from both ranks, every val image once
    with (ddp_run / "val_predictions.csv").open(newline="") as f:
        preds = list(csv.DictReader(f))
    val_ids = ShardSet(state["data"]["shards"]).labels("val")[2].tolist()
    assert sorted(int(p["sample_id"]) for p in preds) == sorted(val_ids)
    names = state["data"]["positions"]
    confusion = np.zeros((len(names), len(names)), dtype=int)
    for p in preds:
        confusion[names.index(p["position_true"]), names.index(p["position_pred"])] += 1
    assert confusion.tolist() == best["confusion"]


@pytest.mark.slow
def test_resumed_two_rank_run_ends_like_an_uninterrupted_one(ddp_run: Path, tiny_shards: Path,
                                                            tmp_path: Path) -> None:
    run = tmp_path / "resumed"
    first = cornpipe("train", tiny_shards, "--out", run, "--nproc", "2", "--epochs", "2", "--ema",
                     "--drop-path", "0.1", *TINY_ARGS)
    assert first.returncode == 0, first.stderr[-3000:]
    second = cornpipe("train", "--resume", run, "--epochs", "3", "--nproc", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    straight = torch.load(ddp_run / "last.pt", weights_only=True)
    resumed = torch.load(run / "last.pt", weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 3
    assert_same_weights(straight, resumed)
    assert [without_timing(r) for r in records(run)] == [without_timing(r) for r in records(ddp_run)]


@pytest.mark.slow
def test_a_failing_rank_takes_the_group_down_with_one_line_naming_it(tiny_shards: Path, tmp_path: Path) -> None:
    # validation row 1 is read by rank 1 only (ranks take rows r::2): break its JPEG in a copy of the set
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    tar, idx, k = ShardSet(shards).locate("val", 1)
    offset, size = ShardSet(shards).index(idx)[k]["jpg"]
    with tar.open("r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)
    start = time.monotonic()
    result = cornpipe("train", shards, "--out", tmp_path / "run", "--nproc", "2", "--epochs", "2",
                      "--no-verify",  # the up-front check would catch the damage on every rank
                      "--dist-timeout", "120", *TINY_ARGS)
    assert result.returncode == 1
    assert time.monotonic() - start < 120  # torchrun stopped rank 0; nobody waited for the timeout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: rank 1 of 2: corrupt image in ") and "(val row 1)" in last, last


@pytest.mark.slow
def test_cv_runs_every_fold_on_two_ranks_and_a_rerun_skips_them(tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    args = ["cv", tiny_shards, "--out", out, "--folds", "2", "--nproc", "2", "--epochs", "1",
            "--monitor", "position_accuracy",  # not torchrun's --monitor-interval
            *TINY_ARGS]
    result = cornpipe(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "cv.json").read_text())
    assert [r["run"] for r in summary["rows"]] == ["fold0-seed0", "fold1-seed0"]
    for row in summary["rows"]:
        config = json.loads((out / row["run"] / "config.json").read_text())
        assert config["data"]["world_size"] == 2 and config["monitor"] == "position_accuracy"
    with (out / "oof_predictions.csv").open(newline="") as f:  # every sample once, out of fold
        assert sorted(int(r["sample_id"]) for r in csv.DictReader(f)) == sorted(
            s["id"] for s in ShardSet(tiny_shards).manifest["samples"])
    again = cornpipe(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fold0-seed0: finished earlier, skipped" in again.stdout
    assert "fold1-seed0: finished earlier, skipped" in again.stdout
