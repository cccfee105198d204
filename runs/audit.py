"""Label audit: which given position labels do the held-out predictions most doubt (`cornpipe audit`).

Confident learning (cleanlab's `find_label_issues`, ranked by self-confidence) over predictions made by
models that never trained on the sample: a cv folder's oof_predictions.csv (every sample once per seed;
with several seeds each sample's probabilities are the mean over its seeds), or a run folder's
val_predictions.csv (its validation split only: the audit says it saw part of the data).

    DIR/label_issues.csv   path, source, given, suggested, score   (most suspect first; only the samples
                           cleanlab flags; score = cleanlab's label-quality score of the given label,
                           0 = surely wrong .. 1 = surely right; path = the original path in the manifest)
    DIR/suspects.png       contact sheet of the top suspects, read from the shard set the runs trained on

cleanlab is the `audit` extra; numpy, cleanlab and matplotlib load only when an audit runs.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cornpipe.errors import ConfigError, MissingDependency, install_hint
from cornpipe.runs.cv import CV_JSON
from cornpipe.runs.cv import OOF_CSV as OOF_FILE
from cornpipe.runs.cv_dir import CV_MARKER
from cornpipe.runs.report import CONFIG_FILE, PREDICTIONS_FILE
from cornpipe.shards.atomic import check_can_create, write_atomically

ISSUES_FILE, SHEET_FILE = "label_issues.csv", "suspects.png"
COLUMNS = ("path", "source", "given", "suggested", "score")
SHEET_TOP = 24  # thumbnails on the contact sheet: a page a pathologist reads at a glance


class AuditError(ConfigError):
    """A folder the audit cannot read (not a cv folder or run, no predictions, overlapping folds)."""


@dataclass
class Predictions:
    """Held-out predictions, one entry per sample (seeds averaged)."""

    folder: Path
    kind: str  # "cv" or "run"
    positions: list[str]
    sample_ids: list[int]
    given: list[int]  # index into positions
    probs: list[list[float]]
    rows: dict[int, dict[str, str]]  # sample_id -> its CSV row (path, source, ... as the runs wrote them)
    seeds: list[str]
    shards: str | None


@dataclass
class AuditResult:
    predictions: Predictions
    issues: list[dict[str, Any]]  # COLUMNS + sample_id, most suspect first
    csv_path: Path
    sheet_path: Path | None
    notes: list[str] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return self.predictions.kind == "run"


def _require_cleanlab() -> None:
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        raise MissingDependency(f"cornpipe audit needs the cleanlab package: {install_hint('audit')}") from None


def _shards_of(folder: Path, kind: str) -> str | None:
    """The shard set the runs trained on: the cv marker's config (or its first run's), or the run's config.json."""
    configs = [folder / CV_MARKER] if kind == "cv" else []
    configs += sorted(folder.glob(f"*/{CONFIG_FILE}")) if kind == "cv" else [folder / CONFIG_FILE]
    for path in configs:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        data = data.get("config", data) if isinstance(data, dict) else {}
        if isinstance(data, dict) and isinstance(data.get("shards"), str):
            return _resolve(data["shards"], folder)
    return None


def _resolve(shards: str, folder: Path) -> str:
    """A run's config keeps the shard path as typed (relative to where it trained): from here, or from a
    folder above the run (where `cornpipe train`/`cv` ran, most often)."""
    path = Path(shards)
    if path.is_absolute() or (path / "manifest.json").is_file():
        return shards
    found = next((up / path for up in list(folder.resolve().parents)[:3] if (up / path / "manifest.json").is_file()),
                 None)
    return str(found) if found else shards


def _locate(folder: Path) -> tuple[str, Path]:
    if not folder.is_dir():
        raise AuditError(f"{folder} is not a folder (give a cv folder from `cornpipe cv` or a run folder)")
    if (folder / CV_MARKER).is_file() or (folder / CV_JSON).is_file() or (folder / OOF_FILE).is_file():
        if not (folder / OOF_FILE).is_file():
            raise AuditError(f"{folder} is a cv folder without {OOF_FILE} (its runs wrote no predictions, or the "
                             "cv has not finished): rerun `cornpipe cv` to finish it")
        return "cv", folder / OOF_FILE
    if (folder / CONFIG_FILE).is_file():
        if not (folder / PREDICTIONS_FILE).is_file():
            raise AuditError(f"{folder} is a run without {PREDICTIONS_FILE} (unfinished, or trained before "
                             "cornpipe wrote predictions): nothing to audit")
        return "run", folder / PREDICTIONS_FILE
    raise AuditError(f"{folder} is neither a cv folder ({OOF_FILE}) nor a run folder ({CONFIG_FILE}, "
                     f"{PREDICTIONS_FILE})")


def read_predictions(folder: Path | str) -> Predictions:
    """A cv folder's out-of-fold predictions (seeds averaged per sample) or a run's validation ones."""
    folder = Path(folder)
    kind, path = _locate(folder)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise AuditError(f"{path} is unreadable ({exc})") from exc
    positions = [c[len("prob_"):] for c in header if c.startswith("prob_")]
    missing = [c for c in ("sample_id", "position_true") if c not in header]
    if missing or len(positions) < 2:
        raise AuditError(f"{path} is not a cornpipe predictions file (no {', '.join(missing) or 'prob_<class>'} "
                         "columns)")
    if not records:
        raise AuditError(f"{path} holds no predictions: nothing to audit")
    sums: dict[int, list[float]] = {}
    seen: dict[int, int] = defaultdict(int)
    per_seed: dict[str, set[int]] = defaultdict(set)
    rows: dict[int, dict[str, str]] = {}
    for line, r in enumerate(records, start=2):
        try:
            sid = int(r["sample_id"])
            probs = [float(r[f"prob_{p}"]) for p in positions]
        except (TypeError, ValueError):
            raise AuditError(f"{path} line {line}: sample_id or a prob_ column is not a number") from None
        if r["position_true"] not in positions:
            raise AuditError(f"{path} line {line}: position_true {r['position_true']!r} is none of "
                             f"{', '.join(positions)}")
        seed = r.get("seed", "")
        if sid in per_seed[seed]:  # one seed's runs hold out disjoint folds: a sample twice means overlap
            raise AuditError(f"{path}: sample {sid} is held out twice" + (f" within seed {seed}" if seed else "")
                             + ": its folds overlap, so the predictions are not out-of-fold; rerun `cornpipe cv`")
        per_seed[seed].add(sid)
        if sid in rows and rows[sid]["position_true"] != r["position_true"]:
            raise AuditError(f"{path}: sample {sid} has two given labels ({rows[sid]['position_true']}, "
                             f"{r['position_true']}) across seeds; the runs saw different shard sets")
        rows.setdefault(sid, r)
        sums[sid] = [a + b for a, b in zip(sums.get(sid, [0.0] * len(positions)), probs, strict=True)]
        seen[sid] += 1
    ids = sorted(rows)
    probs = [[v / seen[sid] for v in sums[sid]] for sid in ids]
    return Predictions(folder, kind, positions, ids, [positions.index(rows[s]["position_true"]) for s in ids],
                       probs, rows, sorted(k for k in per_seed if k), _shards_of(folder, kind))


def rank_issues(given: Any, probs: Any) -> tuple[list[int], list[float], list[int]]:
    """(indices cleanlab flags as label issues, most suspect first; every sample's label-quality score;
    the classes cleanlab found too few examples of to flag every issue in)."""
    _require_cleanlab()
    import re
    import warnings

    import numpy as np
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(given, dtype=np.int64)
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)
    p /= p.sum(axis=1, keepdims=True)  # float32 text and seed means: rows sum to 1 only to rounding
    with warnings.catch_warnings(record=True) as caught:  # its per-class warning becomes one note
        warnings.simplefilter("always")
        ranked = find_label_issues(labels, p, return_indices_ranked_by="self_confidence", n_jobs=1)
        scores = get_label_quality_scores(labels, p)
    few = sorted({int(m.group(1)) for w in caught if (m := re.search(r"in class: (\d+), it has too few", str(w.message)))})
    return [int(i) for i in ranked], [float(s) for s in scores], few


def _manifest_samples(shards: str | None) -> tuple[Any, dict[int, dict]] | None:
    if shards is None:
        return None
    from cornpipe.errors import LoaderError
    from cornpipe.shards.shard_set import ShardSet

    try:
        shard_set = ShardSet(shards)
    except LoaderError:
        return None
    return shard_set, {int(s["id"]): s for s in shard_set.manifest["samples"]}


def audit(folder: Path | str, out: Path | str, *, top: int = SHEET_TOP) -> AuditResult:
    """Rank the label issues of a cv or run folder into out/label_issues.csv and out/suspects.png."""
    _require_cleanlab()
    out = Path(out)
    check_can_create(out)
    pred = read_predictions(folder)
    ranked, scores, few = rank_issues(pred.given, pred.probs)
    found = _manifest_samples(pred.shards)
    manifest = found[1] if found else {}
    issues = []
    for i in ranked:
        sid = pred.sample_ids[i]
        sample, row = manifest.get(sid, {}), pred.rows[sid]
        suggested = max(range(len(pred.positions)), key=lambda k: pred.probs[i][k])
        issues.append({"path": sample.get("path", row.get("path", "")),
                       "source": sample.get("source", row.get("source", "")),
                       "given": pred.positions[pred.given[i]], "suggested": pred.positions[suggested],
                       "score": scores[i], "sample_id": sid})
    out.mkdir(parents=True, exist_ok=True)
    with write_atomically(out / ISSUES_FILE, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows([[r["path"], r["source"], r["given"], r["suggested"], f"{r['score']:.4f}"]
                          for r in issues])
    notes = []
    if few:
        notes.append(f"too few samples of {', '.join(pred.positions[k] for k in few)} for cleanlab to flag every "
                     "issue there")
    if pred.kind == "run":
        total = f" of {len(manifest)}" if manifest else ""
        notes.append(f"saw only part of the data: the run's validation split ({len(pred.sample_ids)}{total} "
                     "samples); audit a cv folder (`cornpipe cv`) to check every label")
    sheet = None
    (out / SHEET_FILE).unlink(missing_ok=True)  # an earlier audit's sheet would not match this CSV
    if found is None:
        notes.append(f"no {SHEET_FILE}: the shard set {pred.shards or '(not named in the config)'} is not readable")
    elif issues:
        from cornpipe.runs.audit_sheet import draw_sheet

        sheet = draw_sheet(found[0], [{**r, "sample": manifest[r["sample_id"]]} for r in issues[:top]
                                      if r["sample_id"] in manifest], out / SHEET_FILE, partial=pred.kind == "run")
    return AuditResult(pred, issues, out / ISSUES_FILE, sheet, notes)
