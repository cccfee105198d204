"""The summary of a `bench loaders` run: per row the median images/s over rounds, its spread, and its
ratios to the torch baseline, to the backend's peer (its own library used directly), to the decode
ceiling and, under `--work both`, to the same backend's `--work same` row of the same rounds."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any

from cornpipe.bench.peers import PEER_OF, PEERS

if TYPE_CHECKING:
    from cornpipe.bench.loader_bench import LoaderBenchConfig, Row

FOLDER = "folder"  # the `mode` of the torch baseline over the original images (a folder or a manifest CSV)


def dataset_class_fractions(root: str, split: str) -> list[float]:
    from cornpipe.shards.shard_set import ShardSet

    position = ShardSet(root).labels(split)[0]
    counts = [int((position == c).sum()) for c in range(int(position.max()) + 1)] if len(position) else []
    return [c / max(1, sum(counts)) for c in counts]


def full_vs_same_rounds(full: list[float], same: list[float]) -> list[float]:
    """A backend's full rate over its same rate, round by round (the two rows run one after the other in
    each round, so a round's pair shares the machine's state; their median moves less than the ratio of
    the two medians). Both lists start at the first round; a row that fails is not measured again, so
    the rounds after the shorter list's end are left out."""
    return [f / s for f, s in zip(full, same, strict=False) if f and s]


def summarize(rows: list[Row], cfg: LoaderBenchConfig, ceiling_rates: list[float],
              ceiling_info: dict[str, Any], shard_dirs: list[Path]) -> dict[str, Any]:
    """The JSON-ready summary of a run's rows (bench.loader_bench.Row) and its ceiling."""
    baseline = next((r for r in rows if r.target.backend == "torch" and r.target.mode != FOLDER and r.rates),
                    None)
    base_rate = median(baseline.rates) if baseline else None
    peer_rate = {(r.target.backend, r.target.mode): median(r.rates) for r in rows
                 if r.target.backend in PEERS and r.rates}
    same_rates = {(r.target.backend, r.target.mode, r.target.root): r.rates for r in rows
                  if r.target.work == "same" and r.rates}
    ceiling = median(ceiling_rates) if ceiling_rates else None
    results = []
    for row in rows:
        rate = median(row.rates) if row.rates else None
        entry: dict[str, Any] = {
            "backend": row.target.backend, "mode": row.target.mode, "device": row.device,
            "images_per_s": rate,
            "images_per_s_min": min(row.rates) if row.rates else None,
            "images_per_s_max": max(row.rates) if row.rates else None,
            "ratio_vs_torch": rate / base_rate if rate and base_rate else None,
            "peer": PEER_OF.get(row.target.backend),  # the torch-folder row's peer: torchvision over the files
            "ratio_vs_peer": None,
            "fraction_of_ceiling": rate / ceiling if rate and ceiling and row.target.mode == "jpg" else None,
            "peak_rss_mb": row.peak_rss_mb if row.rates else None,
            "repeats": row.rates, "source": row.target.root,
        }
        peer = peer_rate.get((entry["peer"], row.target.mode))
        if rate and peer:
            entry["ratio_vs_peer"] = rate / peer
        if cfg.work == "both":  # each backend's full row against its same row of the same rounds
            entry["work"] = row.target.work
            same = same_rates.get((row.target.backend, row.target.mode, row.target.root))
            rounds = full_vs_same_rounds(row.rates, same) if row.target.work == "full" and same else []
            entry["full_vs_same"] = median(rounds) if rounds else None
            entry["full_vs_same_rounds"] = rounds or None
        for key in ("first_batch_s", "build_s", "batch_shape", "dtype", "batches_per_epoch", "class_fractions",
                    "augment", "setup"):
            if key in row.extra:
                entry[key] = row.extra[key]
        if row.error:
            entry["error"] = row.error
        results.append(entry)
    summary: dict[str, Any] = {"config": asdict(cfg), "work": cfg.work, "host_only": cfg.host_only,
                               "shards": [str(p) for p in shard_dirs], "results": results}
    if ceiling_info:
        summary["ceiling"] = {**ceiling_info, "images_per_s": ceiling,
                              "images_per_s_min": min(ceiling_rates) if ceiling_rates else None,
                              "images_per_s_max": max(ceiling_rates) if ceiling_rates else None,
                              "repeats": ceiling_rates}
    if cfg.oversample != "none":
        summary["dataset_class_fractions"] = dataset_class_fractions(str(shard_dirs[0]), cfg.split)
    return summary
