"""`cornpipe convert`: a labelled image collection -> one shard set (see shards/fields.py for the layout).

Flow: discover inputs and labels -> check free space -> decode, repair and resize every image in
`workers` processes, staging the tar JPEG (and raw pixels only where the .beton stores them) in the
temporary folder (shards/staging.py) -> resolve duplicates (identical bytes: one is kept when their
labels agree, all are rejected when they conflict) -> stratified split -> per split: the .beton (only
with "beton" in `formats`) and the tar shards + DALI index -> rejected.csv -> manifest.json with the
sha256 of every file -> fsync -> rename the temporary folder to OUT.

`formats` is "beton,wds" (default) or "wds": the tar shards are always written, since the torch,
resident and dali backends, inspect and verify read them; "wds" alone needs no FFCV installed.

Writing is atomic (shards/atomic.py): an interrupted run leaves no OUT, and the next run cleans up and
says so. SIGTERM is handled as Ctrl-C is (the temporary folder is removed); after a kill -9 the
workers die with convert (shards/staging.py). A full disk, found up front or while writing, is one
`no space left on ...` error, with nothing left behind.

Same input and options, same bytes: the tar shards, the .beton (written by one process, in order)
and the manifest, whatever the number of workers.

Memory: peak PSS of convert and its workers is about the interpreter and its libraries plus `workers`
x one image (see shards/staging.py): it does not grow with the number of inputs beyond the per-sample
bookkeeping (a few hundred bytes each).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cornpipe.errors import ConvertError
from cornpipe.shards import fields as F
from cornpipe.shards.atomic import (
    DISK_FULL,
    LOCK_FILE,
    DiskFull,
    check_can_create,
    check_space,
    clean_stale_temp,
    free_bytes,
    fsync_tree,
    lock_folder,
    no_space,
    publish,
    temp_folder,
)
from cornpipe.shards.discover import Candidate, Discovery, Rejection, discover
from cornpipe.shards.duplicates import check_accounting, resolve_duplicates
from cornpipe.shards.files import printable
from cornpipe.shards.imageio import DEFAULT_MAX_PIXELS
from cornpipe.shards.manifest import (
    build_manifest,
    reason_kind,
    write_json,
    write_manifest_hash,
    write_rejected,
)
from cornpipe.shards.space import needed_after_staging, needed_before_staging
from cornpipe.shards.split import assign_split
from cornpipe.shards.staging import Prepared, StagedBytes, StagedSample, Staging, map_prepare
from cornpipe.shards.writers import SMART_THRESHOLD, WRITE_MODES, require_ffcv, write_beton, write_shards

__all__ = ["ConvertParams", "ConvertSummary", "check_accounting", "convert_dataset", "parse_formats"]


@dataclass(frozen=True)
class ConvertParams:
    """Everything that decides the bytes of a shard set (saved in the manifest's `params`)."""

    write_mode: str = "jpg"  # jpg | raw | smart (FFCV RGBImageField write modes)
    max_resolution: int = 512  # px, longest side after resizing (never upscaled)
    jpeg_quality: int = 90  # 1..100, for the .beton (jpg/smart) and the tar shards
    val_fraction: float = 0.2  # share of images in "val", stratified by position x grade
    seed: int = 0  # split seed
    shard_size: int = F.SHARD_SIZE  # samples per tar shard
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit, pixels of the input image
    smart_threshold: int = SMART_THRESHOLD  # smart mode: JPEG above this many raw bytes
    formats: tuple[str, ...] = F.FORMATS  # what is written: ("beton", "wds") or ("wds",)

    def check(self) -> None:
        if self.write_mode not in WRITE_MODES:
            raise ConvertError(f"--write-mode must be one of {', '.join(WRITE_MODES)}, not '{self.write_mode}'")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConvertError(f"--val-fraction must be between 0 and 1 (exclusive), not {self.val_fraction}")
        if not 8 <= self.max_resolution <= 65535:
            raise ConvertError(f"--max-resolution must be between 8 and 65535 px, not {self.max_resolution}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConvertError(f"--jpeg-quality must be between 1 and 100, not {self.jpeg_quality}")
        if self.shard_size < 1:
            raise ConvertError(f"shard size must be at least 1, not {self.shard_size}")
        if self.max_pixels < 1:
            raise ConvertError(f"--max-pixels must be at least 1, not {self.max_pixels}")
        parse_formats(self.formats)  # raises on an unknown name or a set without wds


def parse_formats(value: str | Sequence[str]) -> tuple[str, ...]:
    """Parse "beton,wds" or "wds" (or a sequence of names) into the formats, in F.FORMATS order.

    A .beton alone is refused: every other backend, `inspect` and `verify` read the tar shards.
    """
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in F.FORMATS]
    if not names or unknown:
        shown = value if isinstance(value, str) else ",".join(map(str, value))
        raise ConvertError(f"--formats must be a comma list of {', '.join(F.FORMATS)}, not '{shown}'")
    if "wds" not in names:
        raise ConvertError("--formats must include wds: the torch, resident and dali backends, inspect "
                           "and verify read the tar shards (use --formats beton,wds or --formats wds)")
    return tuple(f for f in F.FORMATS if f in names)


@dataclass
class ConvertSummary:
    out: Path
    found: int
    converted: int
    rejected: int
    seconds: float
    split_counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)  # rejection reason -> count
    cleaned: list[str] = field(default_factory=list)  # leftovers of interrupted runs removed first

    @property
    def images_per_s(self) -> float:
        return self.converted / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"converted {self.converted} + rejected {self.rejected} = found {self.found} "
                f"in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s)")


def _check_paths(src: Path | None, manifest_csv: Path | None, out: Path, force: bool) -> None:
    root = None
    if manifest_csv is not None:
        root = manifest_csv.resolve().parent
    elif src is not None:
        root = src.resolve()
    out_r = out.resolve()
    if root is not None:
        if root == out_r or out_r in root.parents:
            raise ConvertError(f"the input folder {root} is inside OUT {out}; choose another OUT")
        if root in out_r.parents and manifest_csv is None:
            raise ConvertError(f"OUT {out} is inside the input folder {root}; choose a folder outside it")
    if (out.exists() or out.is_symlink()) and not force:
        raise ConvertError(f"{out} exists; use --force to replace it")
    if force:
        _check_replaceable(out)
    check_can_create(out)


def _check_replaceable(out: Path) -> None:
    """--force replaces a shard set (it has manifest.json), an empty folder or a symlink, nothing else."""
    if out.is_symlink() or not out.exists():
        return  # only the link is replaced, never what it points to
    rule = "--force replaces only a cornpipe convert output or an empty folder"
    if not out.is_dir():
        raise ConvertError(f"{out} is a file, not a shard set; {rule}")
    if not (out / F.MANIFEST).is_file() and any(out.iterdir()):
        raise ConvertError(f"{out} is not a shard set (it has no {F.MANIFEST}) and is not empty; {rule}")


# --------------------------------------------------------------------------- the conversion

def convert_dataset(
    src: Path | str | None,
    out: Path | str,
    *,
    manifest_csv: Path | str | None = None,
    grade_scale: Sequence[float] | None = None,
    val_fraction: float = 0.2,
    max_resolution: int = 512,
    write_mode: str = "jpg",
    jpeg_quality: int = 90,
    workers: int | None = None,
    seed: int = 0,
    force: bool = False,
    shard_size: int = F.SHARD_SIZE,
    progress: bool = False,
    on_progress: Callable[[str, int, int | None], None] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    smart_threshold: int = SMART_THRESHOLD,
    formats: str | Sequence[str] = "beton,wds",
) -> ConvertSummary:
    """Convert a survey (folder layout or manifest CSV) into the shard set OUT; see the module doc.

    With a .beton to write, the reported time starts after FFCV is imported (numba makes that take
    seconds): it measures the conversion, and a missing FFCV fails before any image is decoded.
    `progress` draws a rich bar on stderr (for a TTY); `on_progress(step, done, total)` hears each step
    as it starts (done 0; total None when uncounted) and each decoded image (for a log).
    """
    params = ConvertParams(write_mode=write_mode, max_resolution=int(max_resolution),
                           jpeg_quality=int(jpeg_quality), val_fraction=float(val_fraction), seed=int(seed),
                           shard_size=int(shard_size), max_pixels=int(max_pixels),
                           smart_threshold=int(smart_threshold), formats=parse_formats(formats))
    params.check()
    src_p = Path(src) if src is not None else None
    csv_p = Path(manifest_csv) if manifest_csv is not None else None
    out = Path(out).absolute()
    _check_paths(src_p, csv_p, out, force)  # before FFCV's slow import and any discovery
    if "beton" in params.formats:
        require_ffcv()
    start = time.perf_counter()
    workers = max(1, int(workers) if workers else (os.cpu_count() or 1))
    found = discover(src_p, csv_p, grade_scale)

    out.parent.mkdir(parents=True, exist_ok=True)
    cleaned = clean_stale_temp(out)  # first: a dead run's leftovers count as free space
    needed = needed_before_staging(found.samples, params)
    check_space(out.parent, needed)
    tmp = temp_folder(out)
    tmp.mkdir()
    lock_fd = lock_folder(tmp)
    try:
        with _sigterm_as_ctrl_c(), _Progress(progress, on_progress) as bar:
            summary = _convert_into(tmp, found, params, workers, bar, src_p, csv_p, lock_fd)
            fsync_tree(tmp)
            publish(tmp, out, force)  # the lock travels with the folder until the rename is done
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in DISK_FULL:  # after the removal, so "free" is what the user has again
            raise no_space(out.parent, max(needed, getattr(exc, "needed", 0))) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock_fd)
    (out / LOCK_FILE).unlink(missing_ok=True)
    summary.out = out
    summary.seconds = time.perf_counter() - start
    summary.cleaned = [p.name for p in cleaned]
    return summary


@contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """`kill` (SIGTERM) stops convert as Ctrl-C does: KeyboardInterrupt, the temp folder removed."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raw_limit(params: ConvertParams) -> int:
    """Largest image (raw bytes) whose pixels the .beton stores raw, so staging must keep; -1: none."""
    if "beton" not in params.formats or params.write_mode == "jpg":
        return -1
    return params.smart_threshold if params.write_mode == "smart" else 1 << 62


def _convert_into(tmp: Path, found: Discovery, params: ConvertParams, workers: int, bar: _Progress,
                  src: Path | None, manifest_csv: Path | None, lock_fd: int) -> ConvertSummary:
    cands = found.samples
    rejected = list(found.rejected)
    staging = Staging(tmp / "_staging")
    tasks = [(str(c.path), params.max_resolution, params.max_pixels, params.jpeg_quality, _raw_limit(params))
             for c in cands]
    bar.start("decoding", len(tasks))
    staged_at: dict[str, StagedBytes] = {}  # sha256 -> its first copy's bytes in staging
    decoded: list[tuple[Candidate, Prepared]] = []  # without their bytes: those are staged
    with closing(map_prepare(tasks, workers, lock_fd)) as results:
        for cand, result in zip(cands, results, strict=True):
            bar.advance()
            if isinstance(result, str):
                rejected.append(Rejection(cand.rel, result))
                continue
            if result.sha256 not in staged_at:  # identical bytes are staged once
                staged_at[result.sha256] = staging.add(result)
            decoded.append((cand, replace(result, jpeg=b"", pixels=None)))
    staging.close()
    kept, duplicates = resolve_duplicates(decoded)
    rejected += duplicates
    n_found = found.found
    if not kept:
        reason, count = Counter(r.reason for r in rejected).most_common(1)[0] if rejected else ("-", 0)
        raise ConvertError(f"no image could be converted: all {n_found} inputs were rejected "
                           f"(most common reason, {count}x: {reason})")
    outputs = needed_after_staging([staged_at[p.sha256] for _, p in kept],
                                   max(p.width * p.height * 3 for _, p in kept), params)
    if free_bytes(tmp.parent) < outputs:
        raise DiskFull(staging.size() + outputs)

    sources = sorted({c.source for c, _ in kept}, key=_source_key)
    source_of = {name: i for i, name in enumerate(sources)}
    position = np.array([c.position for c, _ in kept], dtype=np.int64)
    grade = np.array([c.grade for c, _ in kept], dtype=np.float64)
    is_val = assign_split(position, grade, params.val_fraction, params.seed)
    for split, mask in (("train", ~is_val), ("val", is_val)):
        if not mask.any():
            raise ConvertError(f"the {split} split would be empty ({len(kept)} images converted, "
                               f"--val-fraction {params.val_fraction}); add images or change --val-fraction")

    samples, staged = [], {s: [] for s in F.SPLITS}
    for sample_id, ((cand, prep), val) in enumerate(zip(kept, is_val, strict=True)):
        split = "val" if val else "train"
        sample = {"id": sample_id, "split": split, "row": len(staged[split]), "path": cand.rel,
                  "source": cand.source, "stage": cand.stage, "position": int(cand.position),
                  "grade": _num(cand.grade), "sha256": prep.sha256, "width": prep.width, "height": prep.height,
                  "orig_width": prep.orig_width, "orig_height": prep.orig_height, "repairs": list(prep.repairs),
                  "meta": dict(cand.meta)}
        samples.append(sample)
        meta = {"id": sample_id, "position": int(cand.position), "grade": _num(cand.grade),
                "source": cand.source, "stage": cand.stage, "path": cand.rel}
        at = staged_at[prep.sha256]
        staged[split].append(StagedSample(sample_id, cand.position, cand.grade, source_of[cand.source],
                                          prep.height, prep.width, at.pixel_offset, at.jpeg_offset,
                                          at.jpeg_size, meta))

    splits = {}
    for split in F.SPLITS:
        rows = staged[split]
        beton = None
        if "beton" in params.formats:
            beton = F.beton_name(split)
            bar.start(f"writing {beton}", None)
            write_beton(tmp / beton, rows, staging, write_mode=params.write_mode,
                        jpeg_quality=params.jpeg_quality, smart_threshold=params.smart_threshold)
        bar.start(f"writing {split} shards", None)
        shards = write_shards(tmp, split, staging.jpeg_path, rows, params.shard_size)
        splits[split] = {"count": len(rows), "beton": beton, "shards": shards}
    staging.remove()

    rejected.sort(key=lambda r: r.path)
    write_rejected(tmp / F.REJECTED, rejected)
    n_rej = len(rejected)
    check_accounting(found=n_found, converted=len(samples), rejected=n_rej)
    bar.start("hashing", None)
    manifest = build_manifest(
        tmp, params=params, sources=sources, grade_scale=found.grade_scale, splits=splits, samples=samples,
        found=n_found, rejected=n_rej,
        inputs={"src": printable(src) if src is not None else None,
                "manifest": printable(manifest_csv) if manifest_csv is not None else None},
    )
    write_json(tmp / F.MANIFEST, manifest)
    write_manifest_hash(tmp)  # last: what `train` and `verify` check the manifest against
    return ConvertSummary(out=tmp, found=n_found, converted=len(samples), rejected=n_rej, seconds=0.0,
                          split_counts={s: splits[s]["count"] for s in F.SPLITS},
                          reasons=dict(Counter(reason_kind(r.reason) for r in rejected)))


def _num(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _source_key(name: str) -> tuple:
    from cornpipe.shards.discover import SOURCE_RE

    m = SOURCE_RE.match(name)
    if m:
        return (0, int(m.group(1)), F.POSITION_CODES.index(m.group(2).lower()), name)
    return (1, 0, 0, name)


class _Progress:
    """A rich progress bar on stderr when asked for (a TTY), and/or counts for `report(step, done, total)`."""

    def __init__(self, enabled: bool, report: Callable[[str, int, int | None], None] | None = None) -> None:
        self.enabled = enabled
        self.report = report
        self._progress = None
        self._task = None
        self._step, self._done, self._total = "", 0, None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(),
                                      console=Console(stderr=True, markup=False), transient=True)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, description: str, total: int | None) -> None:
        if self.report is not None:
            self._step, self._done, self._total = description, 0, total
            self.report(description, 0, total)
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.update(self._task, visible=False)
        self._task = self._progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self.report is not None:
            self._done += n
            self.report(self._step, self._done, self._total)
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

