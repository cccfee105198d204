"""Find every input of a survey and its labels, before any pixel is decoded.

Two layouts are understood:

- a directory SRC with one folder per source `<stage><l|m|t>` (`9l`, `14m`, `19t`, ...), grades either in
  the folder's `labels.csv` (columns `file,grade`; `file` relative to the source folder) or in grade
  sub-folders (`SRC/9l/5/leaf.jpg`). Files directly in SRC that are not images (a README, a summary)
  are dataset metadata and not inputs; everything else found is an input.
- a manifest CSV with columns `path,position,grade` and optional `source,stage`; `path` is relative to
  the CSV's folder and may not leave it. Every row is an input: a path on several rows with other labels
  rejects every row ("conflicting labels", as identical bytes under other labels do); with the same
  labels, the first row is kept. A column named twice is an error: no silent choice of labels. Without a
  source (stage) column the source is UNKNOWN_SOURCE (the stage None): never made up from the position.
  Every other column (`origin`, `camera`, `field_id`, ...) is kept as the sample's metadata (`Candidate.meta`).

Label problems become rejections (`Rejection(path, reason)`), never exceptions; only a layout that cannot
be used at all raises `DatasetError` with a one-line message. A named pipe, device, socket, broken or
looping symlink, or a folder named like an image is an input too, rejected with what it is
(`file_problem`) and never opened. A name that is not valid UTF-8 is rejected under an escaped form.
"""

from __future__ import annotations

import csv
import errno
import io
import math
import os
import posixpath
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cornpipe.errors import DatasetError
from cornpipe.grades import check_grade_scale
from cornpipe.shards.fields import DEFAULT_GRADE_SCALE, POSITION_CODES, POSITION_NAMES, UNKNOWN_SOURCE
from cornpipe.shards.files import NotRegularFile, is_printable, kind_of, open_regular, printable
from cornpipe.shards.imageio import IMAGE_EXTENSIONS

CONFLICTING_LABELS = "identical bytes, conflicting labels"  # the reason, before ": <each copy's labels>"
NOT_UTF8 = "file name is not valid UTF-8 (rename the file)"

LABELS_FILE = "labels.csv"
MANIFEST_COLUMNS = ("path", "position", "grade", "source", "stage")  # any other column is metadata
SOURCE_RE = re.compile(r"^(\d+)([lmt])$", re.IGNORECASE)
POSITION_ALIASES: dict[str, int] = {
    **{name: i for i, name in enumerate(POSITION_NAMES)},
    **{code: i for i, code in enumerate(POSITION_CODES)},
    **{str(i): i for i in range(len(POSITION_NAMES))},
    "top": 2, "u": 2, "bottom": 0, "low": 0, "mid": 1,
}



@dataclass(frozen=True)
class Candidate:
    """An input file with complete, valid labels; its pixels are checked later."""

    path: Path  # absolute path of the file
    rel: str  # posix path relative to SRC (or the manifest's folder): the name users see
    source: str
    stage: int | None
    position: int  # index into POSITION_NAMES
    grade: float  # a value of the grade scale
    meta: dict[str, str] = field(default_factory=dict, compare=False)  # a manifest CSV's other columns


@dataclass(frozen=True)
class Rejection:
    path: str  # relative to SRC (or the manifest's folder)
    reason: str


@dataclass
class Discovery:
    root: Path
    grade_scale: tuple[float, ...]
    samples: list[Candidate] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def found(self) -> int:
        return len(self.samples) + len(self.rejected)


def format_number(value: float) -> str:
    """5.0 -> '5', 2.5 -> '2.5' (grades as people write them)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def format_scale(scale: Sequence[float]) -> str:
    return ",".join(format_number(g) for g in scale)


def normalise_scale(grade_scale: Sequence[float] | None) -> tuple[float, ...]:
    """The scale as floats (DEFAULT_GRADE_SCALE when None), checked with cornpipe.grades' one rule."""
    return check_grade_scale(DEFAULT_GRADE_SCALE if grade_scale is None else grade_scale, error=DatasetError)


def parse_grade(text: str | None, scale: tuple[float, ...]) -> float | str:
    """The grade on the scale, or a rejection reason (str)."""
    text = (text or "").strip()
    if not text:
        return "missing grade"
    try:
        value = float(text)
    except ValueError:
        return f"grade '{text}' is not a number"
    for g in scale:
        if math.isclose(value, g, rel_tol=0.0, abs_tol=1e-6):
            return g
    return f"grade {text} is not on the grade scale {format_scale(scale)}"


def parse_position(text: str | None) -> int | None:
    key = (text or "").strip().lower()
    return POSITION_ALIASES.get(key)


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _clean_rel(text: str) -> str | None:
    """Normalise a relative path from a CSV cell; None when absolute or escaping its folder."""
    text = text.strip().replace("\\", "/")
    if not text or text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        return None
    norm = posixpath.normpath(text)
    if norm == ".." or norm.startswith("../") or norm == ".":
        return None
    return norm


def _is_hidden(rel_parts: Sequence[str]) -> bool:
    return any(part.startswith(".") for part in rel_parts)


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be read as an input file (a rejection reason), or None for a regular file.

    Only the file's metadata is looked at: a named pipe or /dev/zero is never opened.
    """
    if "\x00" in os.fspath(path):
        return "path has a NUL byte"
    try:
        mode = path.stat().st_mode  # follows symlinks
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        if exc.errno == errno.ENAMETOOLONG:
            return f"path too long for the file system ({len(os.fsencode(path))} bytes)"
        if path.is_symlink():
            return f"broken symlink (points to {os.readlink(path)}, which does not exist)"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "file does not exist"
        return f"cannot read file ({exc.strerror or exc})"
    kind = kind_of(mode)
    return None if kind is None else f"not a regular file ({kind})"


def conflicting_labels_reason(copies: Sequence[tuple[str, int, float]]) -> str:
    """The one reason every copy of an input filed under different labels is rejected with:
    `(name, position, grade)` of each copy, sorted by name."""
    labels = ", ".join(f"{name} is {POSITION_NAMES[position]} grade {format_number(grade)}"
                       for name, position, grade in sorted(copies))
    return f"{CONFLICTING_LABELS}: {labels}"


def _files_under(folder: Path) -> list[Path]:
    """Every non-hidden entry under folder that is not a folder, sorted by path: regular files and
    also named pipes, devices, sockets and broken or looping symlinks, so that each is an input that
    gets converted or rejected with its reason, never silently skipped."""
    out = []
    for p in folder.rglob("*"):
        if _is_hidden(p.relative_to(folder).parts):
            continue
        if not p.is_dir():
            out.append(p)
    return sorted(out)


def _read_csv(path: Path, required: Sequence[str], display: str) -> list[tuple[int, dict[str, str]]]:
    """Rows (line number, {lower-cased column: cell}) of a CSV, checking the header."""
    try:
        with io.TextIOWrapper(open_regular(path), newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{display} is empty (needs columns {','.join(required)})")
            columns = [h.strip().lower() for h in header]
            for i, name in enumerate(columns):
                if name and name in columns[:i]:  # which one holds the labels? neither is chosen silently
                    raise DatasetError(f"{display} names the column '{name}' twice (columns "
                                       f"{columns.index(name) + 1} and {i + 1}); keep one")
            missing = [c for c in required if c not in columns]
            if missing:
                raise DatasetError(
                    f"{display} lacks column(s) {','.join(missing)} (needs {','.join(required)})"
                )
            rows = []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                rows.append((reader.line_num, dict(zip(columns, row, strict=False))))
            return rows
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{display} is not UTF-8 text ({exc.reason})") from exc
    except NotRegularFile as exc:
        raise DatasetError(f"{display} is {exc.reason}") from exc
    except OSError as exc:
        raise DatasetError(f"{display} is unreadable ({exc.strerror or exc})") from exc
    except csv.Error as exc:
        raise DatasetError(f"{display} is not a readable CSV ({exc})") from exc


def _image_extension_reason(path: Path) -> str | None:
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return None
    ext = path.suffix or "(none)"
    return f"not an image file (extension {ext})"


def discover(src: Path | str | None, manifest_csv: Path | str | None = None,
             grade_scale: Sequence[float] | None = None) -> Discovery:
    """Every input under `src` (directory layout) or listed in `manifest_csv`, with its labels."""
    scale = normalise_scale(grade_scale)
    if manifest_csv is not None:
        return _printable_names(_discover_manifest(Path(manifest_csv), scale))
    if src is None:
        raise DatasetError("give a source folder or --manifest CSV")
    root = Path(src)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    return _printable_names(_discover_folders(root, scale))


def _printable_names(found: Discovery) -> Discovery:
    """Inputs whose names are not valid UTF-8 are rejected under an escaped name (`caf\\xe9.jpg`):
    manifest.json and rejected.csv are UTF-8, and a name that cannot be written cannot be traced back."""
    bad = [c for c in found.samples if not is_printable(c.rel)]
    if not bad and all(is_printable(r.path) and is_printable(r.reason) for r in found.rejected):
        return found
    found.samples = [c for c in found.samples if is_printable(c.rel)]
    found.rejected = sorted([Rejection(printable(r.path), NOT_UTF8 if not is_printable(r.path) else printable(r.reason))
                             for r in found.rejected] + [Rejection(printable(c.rel), NOT_UTF8) for c in bad],
                            key=lambda r: r.path)
    return found


def _discover_folders(root: Path, scale: tuple[float, ...]) -> Discovery:
    found = Discovery(root=root.resolve(), grade_scale=scale)
    sources = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if SOURCE_RE.match(entry.name):
                sources.append(entry)
            else:
                reason = (f"unknown source folder '{entry.name}' (expected <stage><l|m|t>, "
                          "e.g. 9l 14m 19t)")
                for f in _files_under(entry):
                    found.rejected.append(Rejection(f.relative_to(root).as_posix(), reason))
        elif entry.suffix.lower() in IMAGE_EXTENSIONS:
            reason = file_problem(entry) or "image not inside a source folder (<stage><l|m|t>)"
            found.rejected.append(Rejection(entry.name, reason))
    if not sources:
        raise DatasetError(f"no source folders (<stage><l|m|t>, e.g. 9l 14m 19t) found in {root}")
    for folder in sources:
        _discover_source(root, folder, scale, found)
    found.samples.sort(key=lambda c: c.rel)
    found.rejected.sort(key=lambda r: r.path)
    return found


def _discover_source(root: Path, folder: Path, scale: tuple[float, ...], found: Discovery) -> None:
    match = SOURCE_RE.match(folder.name)
    assert match is not None
    stage, code = int(match.group(1)), match.group(2).lower()
    source = f"{stage}{code}"
    position = POSITION_CODES.index(code)
    labels_path = folder / LABELS_FILE
    files = [f for f in _files_under(folder) if f != labels_path]

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    def accept(f: Path, grade_text: str | None) -> None:
        bad_ext = _image_extension_reason(f)
        if bad_ext:
            found.rejected.append(Rejection(rel(f), bad_ext))
            return
        grade = parse_grade(grade_text, scale)
        if isinstance(grade, str):
            found.rejected.append(Rejection(rel(f), grade))
            return
        found.samples.append(Candidate(f.resolve(), rel(f), source, stage, position, grade))

    problem = file_problem(labels_path) if os.path.lexists(labels_path) else None
    if problem:  # a labels.csv that cannot be read must not turn into "no labels.csv here"
        raise DatasetError(f"{rel(labels_path)} is {problem}" if problem.startswith("not a")
                           else f"{rel(labels_path)}: {problem}")
    if labels_path.is_file():
        display = rel(labels_path)
        rows = _read_csv(labels_path, ("file", "grade"), display)
        by_file: dict[str, list[tuple[int, str]]] = {}
        for line, row in rows:
            name = _clean_rel(row.get("file") or "")
            if name is None:
                cell = (row.get("file") or "").strip()
                reason = ("row without a file name" if not cell
                          else f"file '{cell}' escapes the source folder")
                found.rejected.append(Rejection(f"{display}:{line}", reason))
                continue
            by_file.setdefault(_nfc(name), []).append((line, (row.get("grade") or "").strip()))
        on_disk = {_nfc(f.relative_to(folder).as_posix()): f for f in files}
        for key, f in on_disk.items():
            entries = by_file.get(key)
            problem = file_problem(f)
            if problem:
                found.rejected.append(Rejection(rel(f), problem))
                continue
            if not entries:
                found.rejected.append(Rejection(rel(f), f"no row for this file in {display}"))
                continue
            grades = {g for _, g in entries}
            if len(grades) > 1:
                lines = ", ".join(str(n) for n, _ in entries)
                found.rejected.append(Rejection(
                    rel(f), f"conflicting grades {', '.join(sorted(grades))} in {display} (lines {lines})"))
                continue
            accept(f, entries[0][1])
        for key, entries in by_file.items():
            if key not in on_disk:
                problem = file_problem(folder / key)  # a folder named like an image is not on_disk
                if problem is None or problem == "file does not exist":
                    problem = f"listed in {display} (line {entries[0][0]}) but the file does not exist"
                found.rejected.append(Rejection(f"{folder.name}/{key}", problem))
        return

    for f in files:
        parts = f.relative_to(folder).parts
        problem = file_problem(f)
        if problem:
            found.rejected.append(Rejection(rel(f), problem))
            continue
        if len(parts) == 1:
            found.rejected.append(Rejection(
                rel(f), f"no grade: {folder.name} has no {LABELS_FILE} and the file is not in a grade folder"))
            continue
        if _is_number(parts[0]):
            accept(f, parts[0])
        else:
            found.rejected.append(Rejection(rel(f), f"grade folder '{parts[0]}' is not a number"))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _discover_manifest(csv_path: Path, scale: tuple[float, ...]) -> Discovery:
    problem = file_problem(csv_path)
    if problem == "file does not exist":
        raise DatasetError(f"manifest {csv_path} does not exist")
    if problem:
        raise DatasetError(f"manifest {csv_path} is {problem}" if problem.startswith("not a")
                           else f"manifest {csv_path}: {problem}")
    root = csv_path.resolve().parent
    found = Discovery(root=root, grade_scale=scale)
    rows = _read_csv(csv_path, ("path", "position", "grade"), csv_path.name)
    listed: dict[str, list[tuple[int, dict[str, str]]]] = {}  # path -> its rows, in file order
    for line, row in rows:
        cell = (row.get("path") or "").strip()
        if not cell:
            found.rejected.append(Rejection(f"{csv_path.name}:{line}", "row without a path"))
            continue
        rel = _clean_rel(cell)
        if rel is None:
            found.rejected.append(Rejection(cell, "path escapes the manifest's folder (absolute or '..')"))
            continue
        listed.setdefault(_nfc(rel), []).append((line, row))
    for rel, entries in listed.items():
        labelled = [(line, _manifest_labels(row, scale)) for line, row in entries]
        valid = {(line, lab[2], lab[3]) for line, lab in labelled if not isinstance(lab, str)}
        if len({(position, grade) for _, position, grade in valid}) > 1:  # no silent choice: every row out
            reason = conflicting_labels_reason([(f"{rel} (line {line})", p, g) for line, p, g in valid])
            found.rejected += [Rejection(rel, reason) for _ in entries]
            continue
        (line, labels), *again = labelled
        found.rejected += [Rejection(rel, f"listed again in {csv_path.name} (line {n}; first on line {line})")
                           for n, _ in again]
        path = root / rel
        problem = file_problem(path)
        if problem:
            if problem == "file does not exist":
                problem = f"listed in {csv_path.name} (line {line}) but the file does not exist"
            found.rejected.append(Rejection(rel, problem))
            continue
        bad_ext = _image_extension_reason(path)
        if bad_ext:
            found.rejected.append(Rejection(rel, bad_ext))
            continue
        if isinstance(labels, str):
            found.rejected.append(Rejection(rel, labels))
            continue
        source, stage, position, grade = labels
        first = entries[0][1]  # the row kept: its other columns are the sample's metadata
        meta = {k: v.strip() for k, v in first.items() if k and k not in MANIFEST_COLUMNS and (v or "").strip()}
        found.samples.append(Candidate(path.resolve(), rel, source, stage, position, grade, meta))
    if not rows:
        raise DatasetError(f"manifest {csv_path.name} has no rows")
    found.samples.sort(key=lambda c: c.rel)
    found.rejected.sort(key=lambda r: r.path)
    return found


def _manifest_labels(row: dict[str, str], scale: tuple[float, ...]) -> tuple[str, int | None, int, float] | str:
    position_text = (row.get("position") or "").strip()
    position = parse_position(position_text)
    if position is None:
        return (f"unknown position '{position_text}' (use lower/middle/upper, l/m/t or 0/1/2)"
                if position_text else "missing position")
    grade = parse_grade(row.get("grade"), scale)
    if isinstance(grade, str):
        return grade
    stage_text = (row.get("stage") or "").strip()
    stage: int | None = None
    if stage_text:
        try:
            value = float(stage_text)
        except ValueError:
            return f"stage '{stage_text}' is not a number"
        if math.isnan(value):
            return f"stage '{stage_text}' is not a number"
        if math.isinf(value):  # inf, 1e400: int() would overflow
            return f"stage '{stage_text}' is not a finite number"
        stage = int(value)
    source = (row.get("source") or "").strip()
    match = SOURCE_RE.match(source)
    if match:
        code = match.group(2).lower()
        if POSITION_CODES.index(code) != position:
            return f"source {source} is a {POSITION_NAMES[POSITION_CODES.index(code)]} source but position is {POSITION_NAMES[position]}"
        source = source.lower()
        if stage is None:
            stage = int(match.group(1))
    return (source or UNKNOWN_SOURCE), stage, position, grade
