"""bench loaders: the torchvision peer is a webdataset + torchvision user's pipeline, and --host-only times
the uint8 crops a host would feed a GPU on every backend and peer.

Flat-colour pictures whose red level encodes the position: a label that left its image shows after any
crop and flip."""

from __future__ import annotations

import csv
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import as_format_version_1
from PIL import Image
from test_bench import PEER_BACKENDS, invoke

from cornpipe.bench import loader_bench
from cornpipe.bench.peers import build_peer, peer_unusable
from cornpipe.loaders.backends.folder import make_folder_loader
from cornpipe.loaders.base import IMAGENET, MEAN_255, STD_255
from cornpipe.shards.convert import convert_dataset
from cornpipe.shards.shard_set import ShardSet

N = 48
S = 24


def red(position: int) -> int:
    return 40 + 80 * position


def position_of(images: torch.Tensor) -> list[int]:
    """Each image's position, read from its red level: (B, 3, S, S) normalised float or (B, S, S, 3) uint8."""
    if images.dtype == torch.uint8:
        r = images[..., 0].float()
    else:
        r = images[:, 0].float() * STD_255[0] + MEAN_255[0]
    return [round((level - 40) / 80) for level in r.mean(dim=(1, 2)).tolist()]


@pytest.fixture(scope="module")
def colour_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("peer_colour")
    rows = [("path", "position", "grade")]
    for i in range(N):
        position = i % 3
        h, w = ((30, 40), (40, 30), (36, 36))[i % 3]
        pixels = np.full((h, w, 3), (red(position), 30 + 4 * i, 100), np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        rows.append((f"{i:03d}.png", position, (0, 3, 5, 7, 9)[i % 5]))
    with open(folder / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return folder / "labels.csv"


@pytest.fixture(scope="module", params=[8, 1000], ids=["tar-per-worker", "one-tar"])
def colour_shards(request, colour_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"peer_shards{request.param}") / "shards"
    convert_dataset(None, out, manifest_csv=colour_csv, formats=("wds",), shard_size=request.param, workers=1)
    return out


def one_epoch(peer) -> tuple[list[int], list[int], torch.Tensor]:
    """(labels, positions the images show, the last batch's images) of one pass."""
    labels, shown = [], []
    for batch in peer:
        labels += batch.position.tolist()
        shown += position_of(batch.images)
        last = batch.images
    peer.close()
    return labels, shown, last


@pytest.mark.parametrize("host_only", [False, True], ids=["float", "host-only"])
def test_the_torchvision_peer_reads_the_tars_with_webdataset_and_keeps_labels(colour_shards, host_only):
    shards = ShardSet(colour_shards)
    tars = len(shards.shards("train"))
    peer = build_peer("torchvision", str(colour_shards), split="train", batch_size=5, image_size=S, workers=2,
                      device="cpu", seed=0, host_only=host_only)
    assert ("tars split by worker" in peer.setup) == (tars >= 2)
    assert peer.setup.startswith(f"{tars} tar")
    labels, shown, images = one_epoch(peer)
    # each sample once (no worker's partial batch dropped), with its own label
    assert Counter(labels) == Counter(shards.labels("train")[0].tolist())
    assert shown == labels
    assert images.shape[1:] == ((S, S, 3) if host_only else (3, S, S))
    assert images.dtype == (torch.uint8 if host_only else torch.float32)


def test_the_torchvision_folder_peer_reads_the_files_of_the_torch_folder_split(colour_csv):
    peer = build_peer("torchvision", str(colour_csv), split="train", batch_size=1, image_size=S, workers=1,
                      device="cpu", seed=0, folder=True)
    labels, shown, _ = one_epoch(peer)
    baseline = make_folder_loader(None, "train", manifest_csv=str(colour_csv), workers=0, normalization=IMAGENET, oversample="none")
    assert Counter(labels) == Counter(baseline.position.tolist()) and shown == labels


def test_the_torchvision_peer_is_skipped_without_webdataset(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "webdataset" else real(name, *a))
    run, notes = loader_bench.choose_peers("torch")
    assert run == [] and notes == ["skipped peer torchvision: webdataset is not installed: pip install webdataset"]


def test_a_shard_set_without_text_labels_skips_the_torchvision_peer(tiny_shards, tmp_path):
    old = as_format_version_1(tiny_shards, tmp_path / "v1")
    assert "predates the .cls members" in peer_unusable("torchvision", str(old), "train")
    assert peer_unusable("torchvision", str(tiny_shards), "train") is None
    result = invoke("bench", "loaders", old, "--backends", "torch", "--device", "cpu", "--image-size", 32,
                    "--batch-size", 8, "--workers", 1, "--seconds", 0.3, "--warmup-batches", 1, "--repeats", 1,
                    "--no-ceiling")
    assert result.exit_code == 0, result.output
    assert any(line.startswith("skipped peer torchvision: ") for line in result.output.splitlines())


def host_only_bench(shards: Path, backends: str, out: Path, *extra: object):
    return invoke("bench", "loaders", shards, "--backends", backends, "--host-only", "--image-size", 32,
                  "--batch-size", 8, "--workers", 1, "--seconds", 0.5, "--warmup-batches", 1, "--repeats", 1,
                  "--json", out, *extra)


# slow: every backend and peer library in an isolated process, a cold FFCV import each; make test runs it
@pytest.mark.slow
def test_host_only_reaches_every_row_and_the_json(tiny_shards, synth_raw, tmp_path):
    out = tmp_path / "host.json"
    result = host_only_bench(tiny_shards, "torch,resident", out, "--source", synth_raw)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["host_only"] is True and summary["config"]["host_only"] is True
    rows = {(r["backend"], r["mode"]): r for r in summary["results"]}
    assert set(rows) == {("torch", "jpg"), ("torchvision", "jpg"), ("resident", "jpg"), ("torch", "folder"),
                         ("torchvision", "folder")}
    for row in rows.values():  # measured in the child processes, as they handed the batches out
        assert row["device"] == "cpu" and row["batch_shape"] == [8, 32, 32, 3] and row["dtype"] == "uint8"
        assert row["images_per_s"] > 0
    torch_row = rows[("torch", "jpg")]
    assert torch_row["ratio_vs_peer"] == pytest.approx(torch_row["images_per_s"] / rows[("torchvision", "jpg")]["images_per_s"])
    folder_row = rows[("torch", "folder")]
    assert folder_row["ratio_vs_peer"] == pytest.approx(
        folder_row["images_per_s"] / rows[("torchvision", "folder")]["images_per_s"])
    assert rows[("resident", "jpg")]["fraction_of_ceiling"] > 0  # the ceiling still runs
    assert "tar" in rows[("torchvision", "jpg")]["setup"]
    assert "Host-only loader throughput (uint8 NHWC crops on the CPU, no normalisation)" in result.output
    plain = invoke("bench", "loaders", tiny_shards, "--backends", "torch", "--host-only", "--device", "cuda")
    assert plain.exit_code == 1
    assert plain.output.strip().splitlines()[-1] == \
        "Error: --host-only times uint8 batches on the host: use --device cpu or auto, not cuda"


# slow: every backend and peer library in an isolated process, a cold FFCV import each; make test runs it
@pytest.mark.slow
@pytest.mark.parametrize(("backend", "peer"), PEER_BACKENDS[:2])  # ffcv, dali (torch: above)
def test_host_only_library_peers_hand_out_uint8_nhwc(tiny_shards, tmp_path, backend, peer):
    out = tmp_path / "host.json"
    result = host_only_bench(tiny_shards, backend, out, "--no-ceiling")
    assert result.exit_code == 0, result.output
    rows = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {backend, peer}
    for row in rows.values():
        assert row["batch_shape"] == [8, 32, 32, 3] and row["dtype"] == "uint8" and row["device"] == "cpu"
    assert rows[backend]["ratio_vs_peer"] == pytest.approx(rows[backend]["images_per_s"] / rows[peer]["images_per_s"])
