"""Where the model fails: metrics per value of a sample key (source folder, stage, any manifest metadata
column) and the grade confusion matrix, from per-sample predictions.

The rows are those of RUN/val_predictions.csv (or a cv's oof_predictions.csv), one dict per sample with
`position_true`, `position_pred`, `grade_true`, `grade_pred` and the sample's keys; `join_manifest` adds the
manifest's per-sample keys the file does not carry, its metadata columns included. The keys shown
(`breakdown_keys`): source and stage, each metadata key the run's draw balanced (--oversample-by), and every
manifest metadata column with 2 to MAX_BREAKDOWN_VALUES values (field vs lab photos without asking).
`breakdown(rows, key)` is generic over the key:
accuracy, macro-F1 and grade MAE per value, with percentile 95 % bootstrap intervals when the group
holds at least MIN_N_FOR_INTERVAL samples. Macro-F1 per group averages over the positions present in the
group's truth: a source folder (9l, 14m ...) holds one position only, and averaging over absent classes
would score it 1/3 at best.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cornpipe.models.metrics import scale_indices

BREAKDOWN_KEYS = ("source", "stage")
UNKNOWN = "unknown"
MAX_BREAKDOWN_VALUES = 20  # a metadata column with more values (field_id, ...) is broken down only when asked
MIN_N_FOR_INTERVAL = 10  # fewer samples: a bootstrap interval would only repeat the handful seen
RESAMPLES = 1000
CV_GRADE_CONFUSION = "cv_grade_confusion.png"  # beside cv.md


def read_predictions(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _manifest_samples(shards: str | Path | None) -> list[dict[str, Any]]:
    """The manifest's sample dicts; [] when there is no readable manifest."""
    manifest = Path(shards) / "manifest.json" if shards else None
    if manifest is None or not manifest.is_file():
        return []
    try:
        samples = json.loads(manifest.read_text(encoding="utf-8")).get("samples") or []
    except (json.JSONDecodeError, OSError, AttributeError):
        return []  # the report still reads the columns the predictions carry
    return [s for s in samples if isinstance(s, dict)]


def join_manifest(rows: Sequence[dict[str, Any]], shards: str | Path | None) -> list[dict[str, Any]]:
    """Rows with the manifest's per-sample keys, metadata columns included, added where the row lacks them
    (joined on sample_id)."""
    return _join(rows, _manifest_samples(shards))


def _join(rows: Sequence[dict[str, Any]], samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    by_id = {str(s.get("id")): s for s in samples}
    joined = []
    for row in rows:
        extra = by_id.get(str(row.get("sample_id")), {})
        meta = extra.get("meta") if isinstance(extra.get("meta"), dict) else {}
        joined.append({**meta, **{k: v for k, v in extra.items() if not isinstance(v, (dict, list))}, **row})
    return joined


def breakdown_keys(rows: Sequence[dict[str, Any]], metadata: Sequence[str], oversample_by: str | None = None) -> list[str]:
    """source, stage, each metadata key of `oversample_by` ("position,origin") and each of the `metadata`
    columns whose known values in `rows` number 2 to MAX_BREAKDOWN_VALUES."""
    keys = list(BREAKDOWN_KEYS)
    for key in str(oversample_by or "").split(","):
        if key.strip() and key.strip() not in ("position", "grade", *keys):
            keys.append(key.strip())
    for key in metadata:
        if key not in keys and 2 <= len({_value(r, key) for r in rows} - {UNKNOWN}) <= MAX_BREAKDOWN_VALUES:
            keys.append(key)
    return keys


def manifest_breakdown(rows: Sequence[dict[str, Any]], shards: str | Path | None,
                       oversample_by: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows joined with the manifest of `shards`, the keys to break them down by: breakdown_keys)."""
    samples = _manifest_samples(shards)
    joined = _join(rows, samples)
    metadata = sorted({k for s in samples if isinstance(s.get("meta"), dict) for k in s["meta"]})
    return joined, breakdown_keys(joined, metadata, oversample_by)


def _value(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return UNKNOWN if value is None or str(value).strip() == "" else str(value)


def _sort_key(value: str) -> tuple[int, float, str]:
    """Source folders and stages in survey order (9l, 9m, ... 19t; 9, 14, 19); unknown last."""
    digits = "".join(c for c in value if c.isdigit())
    return (value == UNKNOWN, float(digits) if digits else float("inf"), value)


def _macro_f1(true: np.ndarray, pred: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Macro-F1 over `classes` for each row of (R, N) true/pred index arrays."""
    scores = []
    for c in classes:
        tp = ((true == c) & (pred == c)).sum(axis=-1)
        denom = (true == c).sum(axis=-1) + (pred == c).sum(axis=-1)
        scores.append(np.divide(2 * tp, denom, out=np.zeros(tp.shape, dtype=np.float64), where=denom > 0))
    return np.mean(scores, axis=0)


def group_metrics(true: np.ndarray, pred: np.ndarray, g_true: np.ndarray, g_pred: np.ndarray,
                  seed: int = 0) -> dict[str, Any]:
    """n, accuracy, macro-F1 (positions present in `true`), grade MAE; `ci` when n allows, else None."""
    n = int(true.size)
    classes = np.unique(true)
    out: dict[str, Any] = {"n": n, "accuracy": float((true == pred).mean()),
                           "macro_f1": float(_macro_f1(true, pred, classes)),
                           "grade_mae": float(np.abs(g_pred - g_true).mean()), "ci": None}
    if n >= MIN_N_FOR_INTERVAL:
        idx = np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))  # (R, N)
        t, p = true[idx], pred[idx]
        samples = {"accuracy": (t == p).mean(axis=1), "macro_f1": _macro_f1(t, p, classes),
                   "grade_mae": np.abs(g_pred[idx] - g_true[idx]).mean(axis=1)}
        out["ci"] = {k: [float(x) for x in np.percentile(v, [2.5, 97.5])] for k, v in samples.items()}
    return out


def breakdown(rows: Sequence[dict[str, Any]], key: str, seed: int = 0) -> list[dict[str, Any]]:
    """One entry per value of `key` (survey order, "unknown" last): {"value", "n", "accuracy", "macro_f1",
    "grade_mae", "ci"}; `ci` is {metric: [lo, hi]} or None when the group is too small for one."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_value(row, key), []).append(row)
    names = sorted({str(r["position_true"]) for r in rows} | {str(r["position_pred"]) for r in rows})
    index = {name: i for i, name in enumerate(names)}
    result = []
    for value in sorted(groups, key=_sort_key):
        members = groups[value]
        true = np.array([index[str(r["position_true"])] for r in members])
        pred = np.array([index[str(r["position_pred"])] for r in members])
        g_true = np.array([float(r["grade_true"]) for r in members])
        g_pred = np.array([float(r["grade_pred"]) for r in members])
        result.append({"value": value, **group_metrics(true, pred, g_true, g_pred, seed)})
    return result


def grade_confusion(rows: Sequence[dict[str, Any]], grade_scale: Sequence[float]) -> list[list[int]]:
    """Counts of (true grade level, predicted grade snapped to the nearest level); rows = true."""
    k = len(grade_scale)
    t = scale_indices([float(r["grade_true"]) for r in rows], grade_scale)
    p = scale_indices([float(r["grade_pred"]) for r in rows], grade_scale)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(int).tolist()


def _with_ci(value: float, ci: Sequence[float] | None) -> str:
    return f"{value:.3f}" if ci is None else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def confusion_table(confusion: Sequence[Sequence[int]], names: Sequence[str], what: str) -> list[str]:
    """A headed markdown confusion table: rows = true `what`, columns = predicted `what`."""
    rows = [[f"**{names[i]}**", *(str(c) for c in row), str(sum(row))] for i, row in enumerate(confusion)]
    return [f"Rows = true {what}, columns = predicted {what}; the diagonal is correct.", "",
            *md_table([f"true {what} \\ predicted", *names, "total"], rows)]


def breakdown_section(rows: Sequence[dict[str, Any]], keys: Sequence[str] = BREAKDOWN_KEYS) -> list[str]:
    """Markdown: one table per key (a key whose every value is unknown gets one line instead)."""
    lines = [f"Accuracy, macro-F1 (over the positions present in the group) and grade MAE, with 95 % bootstrap "
             f"intervals; a group of fewer than {MIN_N_FOR_INTERVAL} images is too few to give an interval.", ""]
    for key in keys:
        groups = breakdown(rows, key)
        if all(g["value"] == UNKNOWN for g in groups):
            lines += [f"By {key}: not shown, every sample's {key} is unknown (the manifest does not give it).", ""]
            continue
        table = []
        for g in groups:
            ci = g["ci"] or {}
            table.append([g["value"], str(g["n"]), _with_ci(g["accuracy"], ci.get("accuracy")),
                          _with_ci(g["macro_f1"], ci.get("macro_f1")), _with_ci(g["grade_mae"], ci.get("grade_mae")),
                          "" if g["ci"] else "too few to give an interval"])
        lines += [f"### By {key}", ""]
        lines += md_table([key, "n", "position accuracy", "position macro-F1", "grade MAE", "note"], table) + [""]
    return lines


def grade_names(grade_scale: Sequence[float]) -> list[str]:
    return [f"{float(g):g}" for g in grade_scale]


def predictions_section(rows: Sequence[dict[str, Any]], grade_scale: Sequence[float] | None, png: Path,
                        what: str, keys: Sequence[str] = BREAKDOWN_KEYS) -> list[str]:
    """Markdown for per-sample predictions: the grade confusion (table + PNG at `png`) and the breakdown
    by each key. `what` says whose predictions they are, for the headings."""
    from cornpipe.runs.plots import plot_confusion

    lines: list[str] = []
    if grade_scale is None:  # an old config: the levels seen stand in for the declared scale
        grade_scale = sorted({float(r["grade_true"]) for r in rows})
    if len(grade_scale) >= 2:
        confusion = grade_confusion(rows, grade_scale)
        names = grade_names(grade_scale)
        plot_confusion(confusion, names, png, f"Grade confusion, {what}", what="grade")
        lines += [f"### Grade confusion, {what}", "",
                  "Predicted grades are snapped to the nearest level of the scale.", "",
                  *confusion_table(confusion, names, "grade"), "", f"![grade confusion matrix]({png.name})", ""]
    named = ", ".join(keys[:-1]) + f" and {keys[-1]}" if len(keys) > 1 else keys[0]
    lines += [f"## Breakdown by {named}, {what}", "", *breakdown_section(rows, keys)]
    return lines


def cv_section(out: Path, oof_file: str | None, config: dict[str, Any]) -> str:
    """cv.md's grade confusion and breakdown: the first seed's pooled out-of-fold predictions (every
    sample once), joined with the manifest; empty when the runs left no predictions."""
    if oof_file is None:
        return ""
    rows = read_predictions(out / oof_file)
    if not rows:
        return ""
    seed = rows[0]["seed"]
    rows, keys = manifest_breakdown([r for r in rows if r["seed"] == seed], config.get("shards"),
                                    config.get("oversample_by"))
    scale = (config.get("data") or {}).get("grade_scale")
    lines = predictions_section(rows, scale, out / CV_GRADE_CONFUSION, f"out-of-fold, seed {seed}", keys)
    return "\n" + "\n".join(lines)
