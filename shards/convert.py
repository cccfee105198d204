"""`cornpipe convert`: a labelled image collection -> one shard set (see shards/fields.py for the layout).

Flow: discover inputs and labels -> decode, repair and resize every image in `workers` processes
(staging the pixels and the tar JPEG in the temporary folder) -> drop duplicates -> stratified split ->
per split: the .beton (FFCV's DatasetWriter; only with "beton" in `formats`) and the tar shards + DALI
index -> rejected.csv -> manifest.json with the sha256 of every file -> fsync -> rename the temporary
folder to OUT.

`formats` is "beton,wds" (default) or "wds": the tar shards are always written, since the torch,
resident and dali backends, inspect and verify read them; "wds" alone needs no FFCV installed.

Writing is atomic (shards/atomic.py): an interrupted run leaves no OUT, and the next run cleans up.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from cornpipe.errors import ConvertError
from cornpipe.shards import fields as F
from cornpipe.shards.atomic import (
    LOCK_FILE,
    check_can_create,
    clean_stale_temp,
    fsync_tree,
    lock_folder,
    publish,
    temp_folder,
)
from cornpipe.shards.discover import Candidate, Discovery, Rejection, discover
from cornpipe.shards.imageio import DEFAULT_MAX_PIXELS, ImageRejected, encode_jpeg, prepare_image
from cornpipe.shards.manifest import build_manifest, write_json, write_rejected
from cornpipe.shards.split import assign_split
from cornpipe.shards.writers import (
    SMART_THRESHOLD,
    WRITE_MODES,
    StagedImages,
    StagedSample,
    Staging,
    require_ffcv,
    write_beton,
    write_shards,
)


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

    @property
    def images_per_s(self) -> float:
        return self.converted / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"converted {self.converted} + rejected {self.rejected} = found {self.found} "
                f"in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s)")


# --------------------------------------------------------------------------- worker side

def _prepare_one(path: str, max_resolution: int, max_pixels: int, jpeg_quality: int):
    """Runs in a worker: file -> (sha256, orig_w, orig_h, repairs, pixels, jpeg) or a rejection reason."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return f"cannot read file ({exc.strerror or exc})"
    try:
        img = prepare_image(data, max_resolution=max_resolution, max_pixels=max_pixels)
        jpeg = encode_jpeg(img.pixels, jpeg_quality)
    except ImageRejected as exc:
        return str(exc)
    except MemoryError:
        return "image too large to decode in memory"
    except Exception as exc:  # a decoder bug on one odd file must not stop the survey
        return f"cannot decode image ({type(exc).__name__}: {exc})"
    return (img.sha256, img.orig_width, img.orig_height, img.repairs, img.pixels, jpeg)


def _prepare_star(args: tuple) -> object:
    return _prepare_one(*args)


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the main process, which stops the pool and removes the temp folder."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _map_prepare(tasks: Sequence[tuple], workers: int) -> Iterator:
    """Results of `_prepare_one` in task order, computed by `workers` processes."""
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield _prepare_star(t)
        return
    # fork: workers start in milliseconds and need nothing from __main__; they only run PIL/OpenCV.
    method = "fork" if "fork" in _start_methods() else None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context(method), initializer=_ignore_sigint)
    try:
        chunk = max(1, min(16, len(tasks) // (workers * 4)))
        yield from pool.map(_prepare_star, tasks, chunksize=chunk)
    finally:  # on an error or Ctrl-C in the consumer, drop queued work instead of finishing it
        pool.shutdown(wait=True, cancel_futures=True)


def _start_methods() -> list[str]:
    import multiprocessing

    return multiprocessing.get_all_start_methods()


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
    max_pixels: int = DEFAULT_MAX_PIXELS,
    smart_threshold: int = SMART_THRESHOLD,
    formats: str | Sequence[str] = "beton,wds",
) -> ConvertSummary:
    """Convert a survey (folder layout or manifest CSV) into the shard set OUT; see the module doc.

    With a .beton to write, the reported time starts after FFCV is imported (numba makes that take
    seconds): it measures the conversion, and a missing FFCV fails before any image is decoded.
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
    clean_stale_temp(out)
    tmp = temp_folder(out)
    tmp.mkdir()
    lock_fd = lock_folder(tmp)
    try:
        with _Progress(progress) as bar:
            summary = _convert_into(tmp, found, params, workers, bar, src_p, csv_p)
        fsync_tree(tmp)
        publish(tmp, out, force)  # the lock travels with the folder until the rename is done
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock_fd)
    (out / LOCK_FILE).unlink(missing_ok=True)
    summary.out = out
    summary.seconds = time.perf_counter() - start
    return summary


def _convert_into(tmp: Path, found: Discovery, params: ConvertParams, workers: int,
                  bar: _Progress, src: Path | None, manifest_csv: Path | None) -> ConvertSummary:
    cands = found.samples
    rejected = list(found.rejected)
    staging = Staging(tmp / "_staging")
    tasks = [(str(c.path), params.max_resolution, params.max_pixels, params.jpeg_quality) for c in cands]
    bar.start("decoding", len(tasks))
    kept: dict[str, Candidate] = {}  # sha256 -> first candidate with those bytes (sorted by path)
    prepared: list[tuple[Candidate, StagedSample, dict]] = []
    with closing(_map_prepare(tasks, workers)) as results:
        for cand, result in zip(cands, results, strict=True):
            bar.advance()
            _take_result(cand, result, staging, kept, prepared, rejected)
    staging.close()
    n_found = found.found
    if not prepared:
        reason, count = Counter(r.reason for r in rejected).most_common(1)[0] if rejected else ("-", 0)
        raise ConvertError(f"no image could be converted: all {n_found} inputs were rejected "
                           f"(most common reason, {count}x: {reason})")

    sources = sorted({c.source for c, _, _ in prepared}, key=_source_key)
    source_of = {c.source: sources.index(c.source) for c, _, _ in prepared}
    position = np.array([c.position for c, _, _ in prepared], dtype=np.int64)
    grade = np.array([c.grade for c, _, _ in prepared], dtype=np.float64)
    is_val = assign_split(position, grade, params.val_fraction, params.seed)
    for split, mask in (("train", ~is_val), ("val", is_val)):
        if not mask.any():
            raise ConvertError(f"the {split} split would be empty ({len(prepared)} images converted, "
                               f"--val-fraction {params.val_fraction}); add images or change --val-fraction")

    samples, staged = [], {s: [] for s in F.SPLITS}
    for sample_id, ((cand, st, info), val) in enumerate(zip(prepared, is_val, strict=True)):
        split = "val" if val else "train"
        row = len(staged[split])
        sample = {"id": sample_id, "split": split, "row": row, "path": cand.rel, "source": cand.source,
                  "stage": cand.stage, "position": int(cand.position), "grade": _num(cand.grade), **info}
        samples.append(sample)
        meta = {"id": sample_id, "position": int(cand.position), "grade": _num(cand.grade),
                "source": cand.source, "stage": cand.stage, "path": cand.rel}
        staged[split].append(StagedSample(sample_id, st.position, st.grade, source_of[cand.source],
                                          st.height, st.width, st.pixel_offset, st.jpeg_offset,
                                          st.jpeg_size, meta))

    splits = {}
    for split in F.SPLITS:
        rows = staged[split]
        beton = None
        if "beton" in params.formats:
            beton = F.beton_name(split)
            bar.start(f"writing {beton}", None)
            write_beton(tmp / beton, StagedImages(staging.pixels_path, rows),
                        write_mode=params.write_mode, jpeg_quality=params.jpeg_quality,
                        smart_threshold=params.smart_threshold, workers=workers)
        bar.start(f"writing {split} shards", None)
        shards = write_shards(tmp, split, staging.jpeg_path, rows, params.shard_size)
        splits[split] = {"count": len(rows), "beton": beton, "shards": shards}
    staging.remove()
    (tmp / "_staging").rmdir()

    rejected.sort(key=lambda r: r.path)
    write_rejected(tmp / F.REJECTED, rejected)
    n_rej = len(rejected)
    assert len(samples) + n_rej == n_found, "every input must be converted or rejected"
    bar.start("hashing", None)
    manifest = build_manifest(
        tmp, params=params, sources=sources, grade_scale=found.grade_scale, splits=splits, samples=samples,
        found=n_found, rejected=n_rej,
        inputs={"src": str(src) if src is not None else None,
                "manifest": str(manifest_csv) if manifest_csv is not None else None},
    )
    write_json(tmp / F.MANIFEST, manifest)
    return ConvertSummary(out=tmp, found=n_found, converted=len(samples), rejected=n_rej, seconds=0.0,
                          split_counts={s: splits[s]["count"] for s in F.SPLITS},
                          reasons=dict(Counter(_reason_kind(r.reason) for r in rejected)))


def _take_result(cand: Candidate, result: object, staging: Staging, kept: dict[str, Candidate],
                 prepared: list, rejected: list[Rejection]) -> None:
    """Stage one worker result, or record why the input is rejected (bad image, duplicate bytes)."""
    if isinstance(result, str):
        rejected.append(Rejection(cand.rel, result))
        return
    sha, ow, oh, repairs, pixels, jpeg = result
    if sha in kept:
        rejected.append(Rejection(cand.rel, f"duplicate of {kept[sha].rel} (same bytes)"))
        return
    kept[sha] = cand
    p_off, j_off = staging.add(pixels, jpeg)
    h, w = pixels.shape[:2]
    info = {"sha256": sha, "width": int(w), "height": int(h), "orig_width": int(ow),
            "orig_height": int(oh), "repairs": list(repairs)}
    prepared.append((cand, StagedSample(-1, cand.position, cand.grade, -1, int(h), int(w), p_off, j_off,
                                        len(jpeg), {}), info))


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0]


def _num(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _source_key(name: str) -> tuple:
    from cornpipe.shards.discover import SOURCE_RE

    m = SOURCE_RE.match(name)
    if m:
        return (0, int(m.group(1)), F.POSITION_CODES.index(m.group(2).lower()), name)
    return (1, 0, 0, name)


class _Progress:
    """A rich progress bar on stderr when asked for (a TTY); otherwise silent."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, description: str, total: int | None) -> None:
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.update(self._task, visible=False)
        self._task = self._progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

