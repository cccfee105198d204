"""manifest.json and rejected.csv of a shard set (layout documented in shards/fields.py)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cornpipe.shards import fields as F
from cornpipe.shards.discover import CONFLICTING_LABELS, Rejection, format_number
from cornpipe.shards.files import open_regular
from cornpipe.shards.imageio import HIGH_BIT_DEPTH_RULE


def reason_kind(reason: str) -> str:
    """A rejection reason without its details (the path, the decoder's message): what summaries count."""
    if reason.startswith(CONFLICTING_LABELS):
        return CONFLICTING_LABELS
    return reason.split(" (")[0]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest_hash(root: Path) -> None:
    """manifest.sha256 beside manifest.json, in `sha256sum` format (so `sha256sum -c` checks it too)."""
    (root / F.MANIFEST_HASH).write_text(f"{sha256_file(root / F.MANIFEST)}  {F.MANIFEST}\n")


def write_rejected(path: Path, rejected: Iterable[Rejection]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(F.REJECTED_COLUMNS)
        for r in rejected:
            w.writerow([r.path, r.reason])


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def count_cells(samples: Sequence[dict], positions: Sequence[str]) -> dict:
    """{split: {source: {position name: {grade: n}}}} with every level sorted."""
    out: dict = {}
    for s in sorted(samples, key=lambda s: (s["split"], s["source"], s["position"], s["grade"])):
        cell = out.setdefault(s["split"], {}).setdefault(s["source"], {}).setdefault(positions[s["position"]], {})
        key = format_number(s["grade"])
        cell[key] = cell.get(key, 0) + 1
    return out


def build_manifest(folder: Path, *, params: Any, sources: Sequence[str], grade_scale: Sequence[float],
                   splits: dict, samples: list[dict], found: int, rejected: int,
                   inputs: dict) -> dict:
    """The manifest of the shard set written in `folder` (hashes every file there)."""
    positions = list(F.POSITION_NAMES)
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name not in (F.MANIFEST,) and not p.name.startswith("."):
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return {
        "format_version": F.FORMAT_VERSION,
        "positions": positions,
        "sources": list(sources),
        "metadata": sorted({key for s in samples for key in s.get("meta", {})}),  # a manifest CSV's extra columns
        "grade_scale": [int(g) if float(g).is_integer() else float(g) for g in grade_scale],
        "params": {**asdict(params), "resize": "lanczos", "high_bit_depth": HIGH_BIT_DEPTH_RULE, "inputs": inputs},
        "splits": splits,
        "counts": {
            "found": found,
            "converted": len(samples),
            "rejected": rejected,
            "per_split": {s: splits[s]["count"] for s in splits},
            "cells": count_cells(samples, positions),
        },
        "samples": samples,
        "files": files,
    }
