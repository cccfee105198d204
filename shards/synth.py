"""The built-in dataset: synthetic maize-leaf photos in the team's real source-folder layout.

`make_synthetic(OUT)` writes `OUT/<stage><pos>/` for the nine sources of `fields.SOURCES`, each with
JPEG images and a `labels.csv` (`file,grade`). What a picture shows depends on its labels, with noise:

- position (lower / middle / upper) sets the leaf's colour and width: lower leaves are older, darker
  and yellow-olive and fill the frame; middle leaves are mid green; upper leaves are light blue-green
  and narrower. Hue survives crops, flips and brightness/contrast/saturation jitter, so the cue stays
  visible after the training augmentation.
- grade sets the necrotic lesions: none at the scale's lowest grade (healthy), then a number and a
  total area of cigar-shaped tan lesions that grow with the grade, spread over the whole leaf.
- stage (9, 14, 19) makes the leaf slightly wider as the plant grows.
- noise: leaf angle, curvature and placement, veins, lighting, sensor noise, pale specks that are not
  lesions, background soil, JPEG quality.

Every image is a pure function of (seed, source, image index, grade scale, image size), so the same
seed gives the same bytes whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.context import BaseContext
from pathlib import Path

from cornpipe.errors import CornpipeError, SynthError
from cornpipe.grades import check_grade_scale
from cornpipe.shards.atomic import check_can_create
from cornpipe.shards.fields import DEFAULT_GRADE_SCALE, POSITION_CODES, POSITION_NAMES, SOURCES

LABELS_FILE = "labels.csv"
LABELS_COLUMNS: tuple[str, str] = ("file", "grade")
MIN_IMAGE_SIZE = 32  # px
MAX_IMAGE_SIZE = 4096  # px
_POOL_MIN_PIXELS = 100 * 512 * 512  # drawing less than this runs in-process (docs/performance.md, Synth)



# ---------------------------------------------------------------------------------------------
# option parsers (also used by `convert --grade-scale`)


def parse_grade_scale(text: str) -> tuple[int, ...]:
    """`"0,3,5,7,9"` -> (0, 3, 5, 7, 9); `"0-25"` -> (0, 1, ..., 25). Raises a one-line CornpipeError."""
    cleaned = (text or "").strip()
    if not cleaned:
        raise CornpipeError("grade scale is empty (give e.g. 0,3,5,7,9 or 0-25)")
    match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", cleaned)
    if match:
        low, high = int(match.group(1)), int(match.group(2))
        if high <= low:
            raise CornpipeError(f"grade scale range {cleaned!r} must go up (e.g. 0-25)")
        return tuple(range(low, high + 1))
    values = []
    for token in cleaned.split(","):
        token = token.strip()
        try:
            values.append(int(token))
        except ValueError:
            raise CornpipeError(
                f"grade scale {cleaned!r}: {token!r} is not a whole number (give e.g. 0,3,5,7,9 or 0-25)"
            ) from None
    return validate_grade_scale(values, text=cleaned)


def validate_grade_scale(values: Sequence[int], *, text: str | None = None) -> tuple[int, ...]:
    """Check a grade scale: whole grades (synthetic labels are integers), then cornpipe.grades' one rule."""
    shown = text if text is not None else ",".join(str(v) for v in values)
    for value in values:
        if isinstance(value, bool) or int(value) != value:
            raise CornpipeError(f"grade scale {shown!r}: {value!r} is not a whole number")
    return tuple(int(v) for v in check_grade_scale(values, shown=shown))


def parse_position_weights(text: str) -> tuple[float, float, float]:
    """`"0.6,0.3,0.1"` (lower, middle, upper) -> weights normalised to sum 1."""
    tokens = [t.strip() for t in (text or "").split(",")]
    if len(tokens) != len(POSITION_NAMES):
        raise CornpipeError(
            f"position weights {text!r}: need {len(POSITION_NAMES)} numbers for "
            f"{'/'.join(POSITION_NAMES)}, e.g. 0.6,0.3,0.1"
        )
    values = []
    for token in tokens:
        try:
            values.append(float(token))
        except ValueError:
            raise CornpipeError(f"position weights {text!r}: {token!r} is not a number") from None
    return validate_position_weights(values, text=text)


def validate_position_weights(
    values: Sequence[float], *, text: str | None = None
) -> tuple[float, float, float]:
    shown = text if text is not None else ",".join(str(v) for v in values)
    if len(values) != len(POSITION_NAMES):
        raise CornpipeError(f"position weights {shown!r}: need {len(POSITION_NAMES)} numbers")
    weights = [float(v) for v in values]
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise CornpipeError(f"position weights {shown!r}: weights must be finite and >= 0")
    total = sum(weights)
    if total <= 0:
        raise CornpipeError(f"position weights {shown!r}: at least one weight must be > 0")
    lower, middle, upper = (w / total for w in weights)
    return lower, middle, upper


# ---------------------------------------------------------------------------------------------
# one image a job: a pure function of its fields, so workers do not change the output


@dataclass(frozen=True)
class _Job:
    seed: int
    source_index: int
    index: int  # image index within its source
    image_size: int  # px
    grade_scale: tuple[int, ...]
    folder: str  # where the image is written


def _render_job(job: _Job) -> tuple[str, int, int]:
    """Worker: draw one image, write it; returns (file name, grade, bytes written)."""
    from cornpipe.shards.synth_draw import render_image  # numpy and PIL: not for `cornpipe --help`

    source = SOURCES[job.source_index]
    grade, data = render_image(job.seed, source, job.index, job.image_size, job.grade_scale)
    name = f"{source}_{job.index:05d}.jpg"
    with open(os.path.join(job.folder, name), "wb") as handle:
        handle.write(data)
    return name, grade, len(data)


# ---------------------------------------------------------------------------------------------
# the dataset


def _pool_context() -> BaseContext:
    """fork where the OS has it: a spawned worker would re-import `loaders` (and torch) first.
    Workers only run numpy and PIL, which are safe after fork."""
    return get_context("fork" if "fork" in get_all_start_methods() else "spawn")


def images_per_source(
    per_source: int, position_weights: Sequence[float] | None = None
) -> dict[str, int]:
    """Images per source: `per_source` each, or round(per_source * 3 * weight of its position)."""
    if position_weights is None:
        return {source: per_source for source in SOURCES}
    weights = validate_position_weights(position_weights)
    by_code = dict(zip(POSITION_CODES, weights, strict=True))
    return {s: round(per_source * len(POSITION_CODES) * by_code[s[-1]]) for s in SOURCES}


_IMAGE_NAME = re.compile(r"^(?P<source>\d+[lmt])_\d{5,}\.jpg$")  # _render_job's names


def _foreign_entry(out: Path) -> str | None:
    """The first entry of `out` (relative, posix) that make_synthetic does not write, or None.

    A synth output holds only source folders (fields.SOURCES) of `labels.csv` and `<source>_NNNNN.jpg`;
    a user's survey in the same layout has other file names, so --force never takes it for one.
    """
    for entry in sorted(out.iterdir()):
        if entry.name not in SOURCES or entry.is_symlink() or not entry.is_dir():
            return entry.name
        for item in sorted(entry.iterdir()):
            match = _IMAGE_NAME.match(item.name)
            ours = item.name == LABELS_FILE or (match is not None and match.group("source") == entry.name)
            if not ours or item.is_symlink() or not item.is_file():
                return f"{entry.name}/{item.name}"
    return None


def _prepare_out(out: Path, force: bool) -> None:
    """Refuse an OUT that holds something, unless force and it is a synth output; never replace / or home."""
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise SynthError(f"{out} exists and is not empty (use --force to replace it)")
        resolved = out.resolve()
        if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
            raise SynthError(f"refusing to replace {out}")
        foreign = _foreign_entry(out)
        if foreign is not None:
            raise SynthError(f"{out} holds {foreign}, which cornpipe synth does not write; "
                             "--force replaces only a synth output or an empty folder")
    check_can_create(out)


def make_synthetic(
    out: str | os.PathLike[str],
    per_source: int = 40,
    image_size: int = 512,
    grade_scale: Sequence[int] = DEFAULT_GRADE_SCALE,
    position_weights: Sequence[float] | None = None,
    seed: int = 0,
    force: bool = False,
    workers: int | None = 1,
) -> dict:
    """Write the synthetic collection to OUT; returns a summary (counts, bytes, seconds).

    workers: processes drawing images (None = all cores); the output does not depend on it.
    The collection is written beside OUT and renamed into place, so OUT is never half-written.
    """
    start = time.perf_counter()
    if isinstance(per_source, bool) or int(per_source) != per_source or per_source < 1:
        raise SynthError(f"images per source must be a whole number >= 1, got {per_source!r}")
    if not MIN_IMAGE_SIZE <= int(image_size) <= MAX_IMAGE_SIZE:
        raise SynthError(f"image size must be {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} px, got {image_size}")
    if int(seed) != seed or seed < 0:
        raise SynthError(f"seed must be a whole number >= 0, got {seed!r}")
    scale = validate_grade_scale(grade_scale)
    counts = images_per_source(int(per_source), position_weights)
    if sum(counts.values()) == 0:
        raise SynthError("no images to write: per-source count and position weights give 0 images")
    out = Path(out)
    _prepare_out(out, force)

    staging = out.parent / f".{out.name}.synth-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        jobs = []
        for source_index, source in enumerate(SOURCES):
            if counts[source] == 0:
                continue  # a position weighted 0 has no folder at all
            folder = staging / source
            folder.mkdir(parents=True)
            jobs += [_Job(int(seed), source_index, i, int(image_size), scale, str(folder))
                     for i in range(counts[source])]
        wanted = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
        n_workers = min(wanted, len(jobs))
        # a pool pays off only for seconds of drawing: its start-up costs more than a small job
        if n_workers > 1 and len(jobs) * int(image_size) ** 2 >= _POOL_MIN_PIXELS:
            with ProcessPoolExecutor(n_workers, mp_context=_pool_context()) as pool:
                results = list(pool.map(_render_job, jobs, chunksize=max(1, len(jobs) // (4 * n_workers))))
        else:
            results = [_render_job(job) for job in jobs]
        rows: dict[str, list[tuple[str, int]]] = {}
        for job, (name, grade, _) in zip(jobs, results, strict=True):
            rows.setdefault(SOURCES[job.source_index], []).append((name, grade))
        for source, source_rows in rows.items():
            with open(staging / source / LABELS_FILE, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(LABELS_COLUMNS)
                writer.writerows(source_rows)
        if out.exists():
            shutil.rmtree(out) if any(out.iterdir()) else out.rmdir()
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    positions: Counter[str] = Counter()
    grades: Counter[int] = Counter()
    for job, (_, grade, _) in zip(jobs, results, strict=True):
        code = SOURCES[job.source_index][-1]
        positions[POSITION_NAMES[POSITION_CODES.index(code)]] += 1
        grades[grade] += 1
    return {
        "out": str(out),
        "images": len(jobs),
        "sources": {s: n for s, n in counts.items() if n},
        "positions": {name: positions[name] for name in POSITION_NAMES},
        "grades": {g: grades[g] for g in scale},
        "grade_scale": list(scale),
        "image_size": int(image_size),
        "seed": int(seed),
        "bytes": sum(nbytes for _, _, nbytes in results),
        "seconds": time.perf_counter() - start,
    }
