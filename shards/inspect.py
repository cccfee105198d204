"""`cornpipe inspect` (what is in a shard set) and `cornpipe verify` (is every byte still intact)."""

from __future__ import annotations

import csv
import json
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from cornpipe.errors import LoaderError, MissingDependency, VerifyError
from cornpipe.shards import fields as F
from cornpipe.shards.discover import file_problem, format_number
from cornpipe.shards.files import NotRegularFile, open_regular, read_regular_text
from cornpipe.shards.manifest import CONFLICTING_LABELS, reason_kind, sha256_file
from cornpipe.shards.shard_set import BetonFile, ShardSet


def _stats(values: list[int]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None}
    a = np.asarray(values)
    return {"min": int(a.min()), "median": float(np.median(a)), "max": int(a.max())}


def _kind(name: str) -> str:
    if name.endswith(".beton"):
        return "beton"
    if name.endswith(".tar"):
        return "tar"
    if name.endswith(".idx"):
        return "idx"
    return "other"


def inspect_shards(root: Path | str) -> dict:
    """JSON-safe summary: counts per split x source x position x grade, image sizes, bytes on disk."""
    shards = ShardSet(root)
    m = shards.manifest
    rows = []
    for split in shards.splits:
        cells = Counter((s["source"], s["position"], s["grade"]) for s in shards.samples(split))
        for (source, position, grade), n in sorted(cells.items(), key=lambda kv: (
                shards.sources.index(kv[0][0]) if kv[0][0] in shards.sources else 1 << 30, kv[0][1], kv[0][2])):
            rows.append({"split": split, "source": source, "position": shards.positions[position],
                         "grade": grade, "count": n})
    sizes = {}
    for split in shards.splits:
        samples = shards.samples(split)
        sizes[split] = {
            "width": _stats([s["width"] for s in samples]),
            "height": _stats([s["height"] for s in samples]),
            "orig_width": _stats([s.get("orig_width", s["width"]) for s in samples]),
            "orig_height": _stats([s.get("orig_height", s["height"]) for s in samples]),
        }
    disk: dict[str, int] = Counter()
    for p in Path(root).iterdir():
        if p.is_file():
            disk[_kind(p.name)] += p.stat().st_size
    reasons = Counter()
    conflicting = []  # identical bytes filed under different labels: the user must decide which is right
    rejected_path = Path(root) / F.REJECTED
    if rejected_path.is_file():
        with open(rejected_path, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                kind = reason_kind(r.get("reason") or "")
                reasons[kind] += 1
                if kind == CONFLICTING_LABELS:
                    conflicting.append({"path": r.get("path") or "", "reason": r.get("reason") or ""})
    return {
        "root": str(root),
        "format_version": m["format_version"],
        "positions": shards.positions,
        "sources": shards.sources,
        "grade_scale": m["grade_scale"],
        "params": m["params"],
        "formats": list(shards.formats),
        "found": m["counts"]["found"],
        "converted": m["counts"]["converted"],
        "rejected": m["counts"]["rejected"],
        "splits": {s: shards.count(s) for s in shards.splits},
        "cells": rows,
        "image_sizes": sizes,
        "bytes": {**{k: disk.get(k, 0) for k in ("beton", "tar", "idx", "other")}, "total": sum(disk.values())},
        "rejected_reasons": dict(reasons.most_common()),
        "conflicting_duplicates": conflicting,
        # {column: {split: {value: n}}}: what `cv --group COLUMN` would hold out (samples without a value uncounted)
        "metadata": {key: {split: dict(sorted(Counter(shards.sample_value(s, key) for s in shards.samples(split)
                                                      if shards.sample_value(s, key) is not None).items()))
                           for split in shards.splits} for key in shards.metadata_keys()},
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render_inspect(info: dict, console) -> None:
    """Print the inspect summary as rich tables."""
    from rich.table import Table
    from rich.text import Text

    p = info["params"]
    console.print(Text.assemble((info["root"], "bold"), f": found {info['found']}, converted {info['converted']}, "
                  f"rejected {info['rejected']}; " + ", ".join(f"{k} {v}" for k, v in info["splits"].items())))
    formats = "tar shards only (no .beton)" if "beton" not in info["formats"] else f"write mode {p['write_mode']}"
    console.print(f"grade scale {','.join(format_number(g) for g in info['grade_scale'])}; formats "
                  f"{','.join(info['formats'])}; {formats}, max resolution {p['max_resolution']} px, "
                  f"JPEG quality {p['jpeg_quality']}")
    grades = info["grade_scale"]
    table = Table(title="images per split x source x position x grade")
    for col in ("split", "source", "position"):
        table.add_column(col)
    for g in grades:
        table.add_column(f"g{format_number(g)}", justify="right")
    table.add_column("total", justify="right")
    groups: dict[tuple, dict] = {}
    for r in info["cells"]:
        groups.setdefault((r["split"], r["source"], r["position"]), {})[r["grade"]] = r["count"]
    for (split, source, position), by_grade in groups.items():
        table.add_row(split, source, position, *[str(by_grade.get(g, 0) or "") for g in grades],
                      str(sum(by_grade.values())))
    console.print(table)
    for key, by_split in info.get("metadata", {}).items():  # a manifest CSV's extra columns
        console.print(f"metadata {key}: " + "; ".join(
            f"{split} " + ", ".join(f"{v} {n}" for v, n in counts.items()) for split, counts in by_split.items()),
            markup=False, highlight=False, soft_wrap=True)
    sizes = Table(title="image sizes (px): stored (original)")
    for col in ("split", "width min/median/max", "height min/median/max"):
        sizes.add_column(col)
    for split, s in info["image_sizes"].items():
        def fmt(a: dict, b: dict) -> str:
            return f"{a['min']}/{a['median']:g}/{a['max']} ({b['min']}/{b['median']:g}/{b['max']})"
        if s["width"]["min"] is not None:
            sizes.add_row(split, fmt(s["width"], s["orig_width"]), fmt(s["height"], s["orig_height"]))
    console.print(sizes)
    b = info["bytes"]
    console.print("on disk: " + ", ".join(f"{k} {_human(b[k])}" for k in ("beton", "tar", "idx", "other"))
                  + f", total {_human(b['total'])}")
    if info["rejected_reasons"]:
        console.print("rejected: " + "; ".join(f"{n}x {r}" for r, n in info["rejected_reasons"].items()))
    if info.get("conflicting_duplicates"):
        console.print(f"{CONFLICTING_LABELS} (all copies rejected; fix the labels and convert again):",
                      markup=False)
        for r in info["conflicting_duplicates"]:
            console.print(f"  {r['path']}: {r['reason'].split(': ', 1)[-1]}", markup=False, soft_wrap=True)


# --------------------------------------------------------------------------- verify

def _check_manifest_hash(shards: ShardSet, damaged: dict[Path, str]) -> None:
    """manifest.json against the sha256 convert recorded beside it. Every set of format version 2 has
    one, so a missing one is damage: deleting it must not skip the check (version 1 sets from before
    manifest.sha256 existed have only their file hashes checked)."""
    root = shards.root
    recorded = root / F.MANIFEST_HASH
    try:
        expected = read_regular_text(recorded).split(maxsplit=1)[:1]
    except FileNotFoundError:
        if shards.manifest["format_version"] >= 2:
            damaged.setdefault(recorded, f"{recorded} is missing (convert writes it beside {F.MANIFEST}; "
                                         f"without it an edited {F.MANIFEST} cannot be told)")
        return
    except (OSError, UnicodeDecodeError, NotRegularFile) as exc:
        damaged.setdefault(recorded, f"{recorded} is unreadable ({exc})")
        return
    if expected != [sha256_file(root / F.MANIFEST)]:
        damaged.setdefault(root / F.MANIFEST, f"{root / F.MANIFEST} was changed after convert (its sha256 is not "
                                              f"the one in {F.MANIFEST_HASH})")


def _check_files(shards: ShardSet, damaged: dict[Path, str], hashes: bool = True) -> int:
    """Size (and, with `hashes`, sha256) of every file in the manifest; records each damaged file."""
    root = shards.root
    _check_manifest_hash(shards, damaged)
    listed = shards.manifest["files"]
    needed = [F.REJECTED]
    for split in shards.splits:
        if shards.has_beton:
            needed.append(shards.beton_path(split, check=False).name)
        for tar, idx in shards.shards(split, check=False):  # each file's kind is checked below
            needed += [tar.name, idx.name]
    for name in needed:
        if name not in listed:
            damaged.setdefault(root / F.MANIFEST, f"{root / F.MANIFEST} is damaged ({name} has no sha256 entry)")
    for name, entry in listed.items():
        path = root / name
        problem = file_problem(path)  # a named pipe is never opened
        if problem:
            damaged.setdefault(path, f"{path} is missing" if problem == "file does not exist" else
                               f"{path} is {problem}" if problem.startswith("not a") else f"{path}: {problem}")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            damaged.setdefault(path, f"{path} is damaged ({size} bytes, manifest says {entry['bytes']})")
        elif hashes and sha256_file(path) != entry["sha256"]:
            damaged.setdefault(path, f"{path} is damaged (sha256 mismatch)")
    return len(listed)


def _check_beton(shards: ShardSet, split: str, damaged: dict[Path, str]) -> int:
    path = shards.beton_path(split, check=False)  # BetonFile says what it is
    samples = shards.samples(split)
    try:
        beton = BetonFile(path)
        if len(beton) != len(samples):
            raise VerifyError(f"{path} is damaged ({len(beton)} samples, manifest says {len(samples)})")
        position, grade, sample_id = shards.labels(split)
        source_id = np.array([shards.sources.index(s["source"]) for s in samples])
        for name, want in ((F.POSITION, position), (F.GRADE, grade), (F.SAMPLE_ID, sample_id),
                           (F.SOURCE_ID, source_id)):
            got = beton.column(name)
            if not np.allclose(got.astype(np.float64), want.astype(np.float64)):
                raise VerifyError(f"{path} is damaged (field {name} differs from the manifest)")
        for row, s in enumerate(samples):
            image = beton.image(row)
            if image.shape != (s["height"], s["width"], 3):
                raise VerifyError(f"{path} is damaged (row {row} is {image.shape[1]}x{image.shape[0]}, "
                                  f"manifest says {s['width']}x{s['height']})")
    except MissingDependency:
        raise  # not damage: FFCV is not installed
    except LoaderError as exc:  # VerifyError included
        damaged.setdefault(path, str(exc))
    return len(samples)


def _check_tar(shards: ShardSet, split: str, damaged: dict[Path, str]) -> int:
    """Every tar shard of `split` against its index and the manifest; a damaged shard does not stop
    the check of the next one (each starts at the row the manifest's shard counts give)."""
    samples = shards.samples(split)
    row = 0
    intact = True
    for entry, (tar, idx) in zip(shards.manifest["splits"][split]["shards"], shards.shards(split, check=False),
                                 strict=True):
        try:
            _check_one_tar(shards, split, tar, idx, row, samples[row:row + entry["count"]])
        except LoaderError as exc:  # VerifyError included
            message = str(exc)
            damaged.setdefault(idx if message.startswith((str(idx), f"index file {idx}")) else tar, message)
            intact = False
        row += entry["count"]
    if intact and row != len(samples):
        damaged.setdefault(shards.root, f"{shards.root} is damaged ({split} shards hold {row} samples, "
                                        f"manifest says {len(samples)})")
    return row


def _text_labels(shards: ShardSet, split: str, row: int) -> tuple[int, float] | None:
    """(position, grade) from a sample's `.cls` and `.grade.txt` members (format version 2), None if unreadable."""
    try:
        position = shards.read_member(split, row, F.TAR_CLASS_EXT).decode("ascii")
        grade = float(shards.read_member(split, row, F.TAR_GRADE_TEXT_EXT).decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return (int(position), float(np.float32(grade))) if position.isdigit() else None


def _check_one_tar(shards: ShardSet, split: str, tar: Path, idx: Path, first_row: int,
                   samples: list[dict]) -> None:
    from cornpipe.shards.imageio import decode_jpeg_rgb

    index = shards.index(idx)
    if len(index) != len(samples):
        raise VerifyError(f"{idx} is damaged ({len(index)} samples, manifest says {len(samples)})")
    try:
        with open_regular(tar) as raw, tarfile.open(fileobj=raw) as tf:
            members = [m for m in tf.getmembers() if m.isfile()]
    except NotRegularFile as exc:
        raise VerifyError(str(exc)) from exc
    except (tarfile.TarError, OSError) as exc:
        raise VerifyError(f"{tar} is damaged ({exc})") from exc
    flat = [(ext, off, size) for entry in index for ext, (off, size) in entry.items()]
    if [(m.name.split(".", 1)[1], m.offset_data, m.size) for m in members] != flat:
        raise VerifyError(f"{idx} does not match {tar.name} (offsets or members differ)")
    starts = np.cumsum([0] + [len(entry) for entry in index])  # members per sample: 5 (version 1) or 7
    for k, s in enumerate(samples):
        row = first_row + k
        key = F.sample_key(s["id"])
        names = {m.name for m in members[starts[k]:starts[k + 1]]}
        if f"{key}.{F.TAR_IMAGE_EXT}" not in names:
            raise VerifyError(f"{tar} is damaged (sample {k} is not id {s['id']})")
        pos = int(np.frombuffer(shards.read_member(split, row, F.TAR_POSITION_EXT), "<i8")[0])
        grade = float(np.frombuffer(shards.read_member(split, row, F.TAR_GRADE_EXT), "<f4")[0])
        sid = int(np.frombuffer(shards.read_member(split, row, F.TAR_ID_EXT), "<i8")[0])
        texts_agree = F.TAR_CLASS_EXT not in index[k] or _text_labels(shards, split, row) == (pos, grade)
        if not texts_agree or (pos, sid) != (s["position"], s["id"]) or not np.isclose(grade, s["grade"]):
            raise VerifyError(f"{tar} is damaged (labels of sample {s['id']} differ from the manifest)")
        try:
            image = decode_jpeg_rgb(shards.read_image_bytes(split, row))
        except LoaderError:
            raise
        except Exception as exc:
            raise VerifyError(f"{tar} is damaged (image of sample {s['id']} does not decode: {exc})") from exc
        if image.shape != (s["height"], s["width"], 3):
            raise VerifyError(f"{tar} is damaged (image of sample {s['id']} has the wrong size)")


def verify_shards(root: Path | str) -> dict:
    """Re-hash every file against the manifest and decode every image of every format written
    (the tar shards only for a `--formats wds` set: no FFCV needed then).

    Returns a summary; raises VerifyError (one line) naming every damaged file, with a count when
    there are several. Every file is checked, however many are damaged.
    """
    start = time.perf_counter()
    shards = ShardSet(root)
    damaged: dict[Path, str] = {}  # file -> its first problem, in the order found
    files = _check_files(shards, damaged)
    beton = tar = 0
    for split in shards.splits:
        if shards.has_beton:
            beton += _check_beton(shards, split, damaged)
        tar += _check_tar(shards, split, damaged)
    if len(damaged) == 1:
        raise VerifyError(next(iter(damaged.values())))
    if damaged:
        raise VerifyError(f"{len(damaged)} files are damaged: " + "; ".join(damaged.values()))
    return {"root": str(root), "formats": list(shards.formats), "files": files, "beton_images": beton,
            "tar_images": tar, "seconds": round(time.perf_counter() - start, 3)}


HASH_LIMIT_BYTES = 2 * 1024**3  # check_shards hashes every file of a set up to this size


def check_shards(root: Path | str, hash_limit_bytes: int = HASH_LIMIT_BYTES) -> dict:
    """What `train` checks before its first epoch, cheaply: the manifest against its recorded sha256,
    every file's size, and every file's sha256 when the set is at most `hash_limit_bytes`. VerifyError
    (one line) naming every damaged file. `cornpipe verify` also decodes every image."""
    start = time.perf_counter()
    shards = ShardSet(root)
    total = sum(entry["bytes"] for entry in shards.manifest["files"].values())
    hashes = total <= hash_limit_bytes
    damaged: dict[Path, str] = {}
    files = _check_files(shards, damaged, hashes=hashes)
    if len(damaged) == 1:
        raise VerifyError(f"{next(iter(damaged.values()))}; run `cornpipe verify` or convert again")
    if damaged:
        raise VerifyError(f"{len(damaged)} files are damaged: " + "; ".join(damaged.values()))
    return {"files": files, "bytes": total, "hashed": hashes, "seconds": round(time.perf_counter() - start, 3),
            "manifest_hashed": (shards.root / F.MANIFEST_HASH).exists()}  # False: a version 1 set from before it


def dumps(info: dict) -> str:
    return json.dumps(info, indent=1, ensure_ascii=False)
