"""The run report, written for the pathologist who reads it first: what best.pt holds, then where it fails.

`write_report(run_dir)` reads `metrics.jsonl` (one JSON object per epoch, written by train.py),
`config.json` and `val_predictions.csv` when present, and writes `report.md`, `curves.png`,
`confusion_matrix.png` and `grade_confusion.png`, and report.html from report.md (runs/html_report.py). report.md opens with the best epoch and its 95 %
intervals in one sentence; the breakdown by source and stage comes from the per-sample predictions
(runs/breakdown.py); the latest epoch against the one before comes last.
`format_epoch_table(record, previous)` is the table the trainer prints after each epoch.

Change % is (current - previous) / |previous| * 100, shown with an arrow (▲ up, ▼ down) and
whether that direction is better or worse for the metric; n/a when the previous value is 0 or absent.
In report.md a validation change is shown only when it exceeds half the width of the metric's 95 %
interval ("within noise" otherwise; "not judged" without an interval), and the automatic advice
("possible overfitting", "learning rate may be too high") needs macro-F1 or accuracy to move that far.
The best epoch is the last record marked `"best": true`; failing that, the highest `"monitor"`
value (lowest when config.json says `monitor_mode: "min"`); failing that, the highest val macro-F1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from cornpipe.errors import OutputError, ReportError
from cornpipe.runs import calibration
from cornpipe.runs.assessment import assess, change_pct, half_width
from cornpipe.runs.breakdown import (
    confusion_table,
    manifest_breakdown,
    md_table,
    predictions_section,
    read_predictions,
)
from cornpipe.runs.explain import CAM_PANEL_FILE  # drawn when training ends; the report only links it
from cornpipe.runs.html_report import write_html
from cornpipe.runs.plots import plot_confusion, plot_curves
from cornpipe.shards.atomic import check_can_create

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
REPORT_FILE = "report.md"
REPORT_HTML_FILE = "report.html"  # the same report as one self-contained page (runs/html_report.py)
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion_matrix.png"
GRADE_CONFUSION_FILE = "grade_confusion.png"
PREDICTIONS_FILE = "val_predictions.csv"  # the best epoch's per-sample validation predictions (runs.evaluation)

# (key, label, higher is better) in table order
TABLE_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("loss", "total loss", False),
    ("position_loss", "position loss", False),
    ("grade_loss", "grade loss", False),
    ("position_accuracy", "position accuracy", True),
    ("position_macro_f1", "position macro-F1", True),
    ("grade_mae", "grade MAE", False),
    ("grade_within_tol", "grade within ±tol", True),
    ("grade_accuracy", "grade accuracy (snapped)", True),
    ("grade_qwk", "grade QWK", True),
    ("images_per_s", "images/s", True),
    ("data_wait_share", "data-wait share", False),
)
QWK_NOTE = ("Grade QWK weighs disagreements on the full declared grade scale, levels absent from this split "
            "included (scikit-learn's default would use only the levels present, shrinking the distances "
            "and flattering kappa when, say, no grade-9 leaf is in the validation split).")
HEADLINE_METRICS = (("position_accuracy", "position accuracy"), ("position_macro_f1", "position macro-F1"),
                    ("grade_mae", "grade MAE"), ("grade_qwk", "grade QWK"))
UNDEFINED = {"grade_qwk": "undefined (one true grade level only)"}  # why compute_metrics returns None
CONFIG_SUMMARY_KEYS = ("model", "grade_head", "loader", "epochs", "batch_size", "image_size", "lr",
                       "optimizer", "oversample", "oversample_by", "loss_weights", "device", "amp", "monitor", "seed")



def load_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """Epoch records sorted by epoch; a resumed run's repeated epoch keeps its latest record.

    A final line cut short (the run was killed mid-write) is skipped; any other bad line raises.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ReportError(f"no {METRICS_FILE} in {run_dir}: is this a training run directory?")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    by_epoch: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            epoch = int(record["epoch"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            if number == len(lines) and not text.endswith("\n"):
                break  # torn last line
            raise ReportError(f"{path}: line {number} is not an epoch record ({exc.__class__.__name__})") from exc
        by_epoch[epoch] = record
    if not by_epoch:
        raise ReportError(f"{path} holds no epoch records yet")
    return [by_epoch[e] for e in sorted(by_epoch)]


def load_config(run_dir: Path | str) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno})") from exc
    return config if isinstance(config, dict) else {}


def _walk(config: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    for key, value in config.items():
        yield key, value
        if isinstance(value, dict):
            yield from _walk(value)


def config_get(config: dict[str, Any], *names: str) -> Any:
    """First value found under any of `names`, at the top level or in a nested section."""
    for name in names:
        for key, value in _walk(config):
            if key == name and not isinstance(value, dict):
                return value
    return None


def format_change(current: float | None, previous: float | None, higher_is_better: bool) -> str:
    pct = change_pct(current, previous)
    if pct is None:
        return "n/a"
    if abs(pct) < 0.05:
        return "= 0.0%"
    better = (pct > 0) == higher_is_better
    return f"{'▲' if pct > 0 else '▼'} {pct:+.1f}% ({'better' if better else 'worse'})"


def format_value(key: str, value: Any) -> str:
    if value is None or isinstance(value, (dict, list)):
        return "—"
    if key == "images_per_s":
        return f"{float(value):,.1f}"
    return f"{float(value):.4f}"


def format_ci(ci: Sequence[float] | None) -> str:
    return "—" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def format_noise_change(current: float | None, previous: float | None, higher_is_better: bool,
                        ci: Sequence[float] | None) -> str:
    """The change only when it exceeds the half-width of the current 95% interval; else "within noise"."""
    if current is None or previous is None:
        return "n/a"
    half = half_width(ci)
    if half is None:
        return "not judged (no interval)"
    if abs(current - previous) <= half + 1e-9:  # float noise: 0.8 - 0.6 > 0.2
        return f"within noise (±{half:.3f})"
    return format_change(current, previous, higher_is_better)


def plain_metric(key: str, split: dict[str, Any]) -> str:
    """`0.910 [0.860, 0.950]`; "undefined (why)" for a metric the split cannot define."""
    value = split.get(key)
    if value is None:
        return UNDEFINED.get(key, "not recorded")
    ci = (split.get("ci") or {}).get(key)
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else " (no interval)")


def headline(records: Sequence[dict[str, Any]], best: dict[str, Any] | None) -> str:
    """The report's first sentence: the epoch best.pt holds and its validation numbers in plain words."""
    last = records[-1]["epoch"]
    shown = best if best is not None else records[-1]
    val = shown.get("val") or {}
    words = ", ".join(f"{label} {plain_metric(key, val)}" for key, label in HEADLINE_METRICS
                      if key in val)
    n = f" on {val['n_samples']} validation images" if val.get("n_samples") else ""
    what = (f"Best epoch {shown['epoch']} of {last} (kept in best.pt)" if best is not None
            else f"No best epoch recorded; latest epoch {shown['epoch']} of {last}")
    return f"{what}: {words or 'no validation metrics recorded'}{n}. Brackets: 95 % bootstrap intervals."


def _metric_rows(split: dict[str, Any]) -> list[tuple[str, str, bool]]:
    return [row for row in TABLE_METRICS if split.get(row[0]) is not None]


def position_names(records: Sequence[dict[str, Any]], config: dict[str, Any]) -> list[str]:
    for record in reversed(records):
        for split in ("val", "train"):
            recall = (record.get(split) or {}).get("position_recall")
            if recall:
                return list(recall)
    names = config_get(config, "positions")
    if isinstance(names, list):
        return [str(n) for n in names]
    confusion = (records[-1].get("val") or {}).get("confusion") or []
    return [str(i) for i in range(len(confusion))]


def find_best(records: Sequence[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any] | None:
    marked = [r for r in records if r.get("best")]
    if marked:
        return marked[-1]
    with_monitor = [r for r in records if isinstance(r.get("monitor"), (int, float))]
    if with_monitor:
        sign = -1.0 if config_get(config, "monitor_mode", "mode") == "min" else 1.0
        return max(with_monitor, key=lambda r: sign * r["monitor"])
    with_f1 = [r for r in records if (r.get("val") or {}).get("position_macro_f1") is not None]
    return max(with_f1, key=lambda r: r["val"]["position_macro_f1"]) if with_f1 else None


def format_epoch_table(record: dict[str, Any], previous: dict[str, Any] | None = None) -> Table:
    """Terminal table for one epoch: metric | train | val | val 95% CI | val previous | change."""
    train, val = record.get("train") or {}, record.get("val") or {}
    prev_val = (previous or {}).get("val") or {}
    table = Table(title=f"Epoch {record.get('epoch', '?')}", title_justify="left")
    for column in ("metric", "train", "val", "val 95% CI", "val previous", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    seen = {key for key, _, _ in _metric_rows(train)} | {key for key, _, _ in _metric_rows(val)}
    ci = val.get("ci") or {}
    for key, label, higher in TABLE_METRICS:
        if key not in seen:
            continue
        table.add_row(label, format_value(key, train.get(key)), format_value(key, val.get(key)),
                      format_ci(ci.get(key)), format_value(key, prev_val.get(key)) if previous else "—",
                      format_change(val.get(key), prev_val.get(key), higher) if previous else "n/a")
    never = val.get("never_predicted") or []
    if never:
        table.caption = f"WARNING: position class(es) never predicted on validation: {', '.join(never)}"
        table.caption_style = "bold red"
    return table


def format_epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One console line per epoch: the numbers the team reads every epoch, a mark on a new best.

    `epoch 3/14  lr 1.0e-03  loss 0.81/0.90  val acc 0.812 F1 0.790 MAE 1.23  312 img/s  wait 4%  * best`
    (loss is train/val; acc, F1 are position accuracy and macro-F1; MAE is the grade's, in scale units).
    """
    train, val = record.get("train") or {}, record.get("val") or {}

    def num(value: Any, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    parts = [f"epoch {record.get('epoch', '?')}/{epochs}", f"lr {num(record.get('lr'), '.1e')}",
             f"loss {num(train.get('loss'), '.3f')}/{num(val.get('loss'), '.3f')}",
             f"val acc {num(val.get('position_accuracy'), '.3f')} F1 {num(val.get('position_macro_f1'), '.3f')} "
             f"MAE {num(val.get('grade_mae'), '.2f')}",
             f"{num(train.get('images_per_s'), ',.0f')} img/s",
             f"wait {num(None if train.get('data_wait_share') is None else 100 * train['data_wait_share'], '.0f')}%"]
    line = "  ".join(parts)
    if record.get("best"):
        line += "  * best"
    never = val.get("never_predicted") or []
    if never:
        line += f"  (never predicted: {', '.join(never)})"
    return line





def _best_table(split: dict[str, Any]) -> list[str]:
    ci = split.get("ci") or {}
    rows = [[label, UNDEFINED.get(key, "—") if split.get(key) is None else format_value(key, split.get(key)),
             format_ci(ci.get(key))] for key, label, _ in TABLE_METRICS if key in split]
    return md_table(["metric", "value", "95 % interval"], rows)


def _latest_table(train: dict[str, Any], val: dict[str, Any], prev: dict[str, Any] | None) -> list[str]:
    """metric | train | validation | its 95% interval | validation previous epoch | change judged on noise."""
    ci = val.get("ci") or {}
    rows = []
    for key, label, higher in TABLE_METRICS:
        if train.get(key) is None and key not in val:
            continue
        shown = UNDEFINED.get(key, "—") if val.get(key) is None and key in val else format_value(key, val.get(key))
        rows.append([label, format_value(key, train.get(key)), shown, format_ci(ci.get(key)),
                     format_value(key, prev.get(key)) if prev else "—",
                     format_noise_change(val.get(key), prev.get(key), higher, ci.get(key)) if prev else "n/a"])
    return md_table(["metric", "train", "validation", "95 % interval", "validation, previous epoch",
                      "change (validation)"], rows)


def _predictions_lines(run_dir: Path, config: dict[str, Any], best: dict[str, Any] | None) -> list[str]:
    """Grade confusion and breakdown from RUN/val_predictions.csv (best.pt's epoch), joined with the manifest."""

    path = run_dir / PREDICTIONS_FILE
    if not path.is_file():
        return [f"No {PREDICTIONS_FILE} yet (written when training ends): the grade confusion and the breakdown "
                "by source and stage need the per-sample predictions.", ""]
    rows, keys = manifest_breakdown(read_predictions(path), config_get(config, "shards"),
                                    config_get(config, "oversample_by"))
    if not rows:
        return [f"{PREDICTIONS_FILE} holds no samples.", ""]
    scale = config_get(config, "grade_scale")
    what = f"validation, epoch {best['epoch']} (best.pt)" if best is not None else "validation, best.pt"
    return predictions_section(rows, scale if isinstance(scale, list) else None, run_dir / GRADE_CONFUSION_FILE,
                               what, keys)


def _cam_lines(run_dir: Path) -> list[str]:
    """"What the model looks at": the activation-map panel drawn when training ended (runs.explain)."""
    lines = ["## What the model looks at", ""]
    if not (run_dir / CAM_PANEL_FILE).is_file():
        return lines + [f"No {CAM_PANEL_FILE}: it is drawn when training ends, with the `explain` extra installed "
                        "(pip install 'cornpipe[explain]'); `cornpipe explain RUN IMAGES... --out DIR` draws the maps "
                        "of any image.", ""]
    return lines + ["Validation errors and correct calls per true position, each with the Grad-CAM of the position "
                    "the model chose (red: where the call rests most). Maps that sit on the background, a border or "
                    "one source's look rather than on the leaf and its lesions are shortcut learning: such a model "
                    "will not carry to another field or camera.", "", f"![activation-map panel]({CAM_PANEL_FILE})",
                    ""]


def write_report(run_dir: Path | str) -> Path:
    """Write report.md, curves.png and the confusion PNGs into `run_dir`; returns report.md's path.
    A run folder that takes no writes (read-only) is one ReportError line.

    Order: what best.pt holds, in plain words; its tables and confusion matrices; where it fails (by source,
    stage, grade); then the latest epoch against the one before, changes judged against the intervals."""
    run_dir = Path(run_dir)
    try:
        check_can_create(run_dir / REPORT_FILE)
        return _write_report(run_dir)
    except OutputError as exc:  # a read-only folder or file system, found before any work
        raise ReportError(f"{exc}: the report was not written") from exc
    except OSError as exc:
        raise ReportError(f"cannot write the report into {run_dir}: {exc.strerror or exc}") from exc


def _write_report(run_dir: Path) -> Path:
    records = load_metrics(run_dir)
    config = load_config(run_dir)
    names = position_names(records, config)
    best = find_best(records, config)
    last = records[-1]
    prev = records[-2] if len(records) >= 2 else None

    plot_curves(records, run_dir / CURVES_FILE, best_epoch=best["epoch"] if best else None)
    shown = best if best is not None and (best.get("val") or {}).get("confusion") else last
    confusion = (shown.get("val") or {}).get("confusion")
    if confusion:
        label = "best, kept in best.pt" if shown is best else "latest"
        plot_confusion(confusion, names, run_dir / CONFUSION_FILE,
                       f"Position confusion, validation, epoch {shown['epoch']} ({label})")

    lines = [f"# Training report: {run_dir.name}", "", headline(records, best), ""]
    summary = [(k, config_get(config, k)) for k in CONFIG_SUMMARY_KEYS]
    summary = [(k, v) for k, v in summary if v is not None]
    if summary:
        lines += ["Run: " + ", ".join(f"{k} `{v}`" for k, v in summary), ""]
    for change in config_get(config, "shard_changes") or []:  # --resume --allow-new-shards
        lines += [f"**Resumed after epoch {change.get('at_epoch')} on another shard set** "
                  f"({change.get('summary')}): epochs before and after are not comparable.", ""]
    tasks = (config.get("data") or {}).get("tasks") or {}  # runs.tasks: decided at the first start
    for task in tasks.get("constant") or []:
        weight = tasks["loss_weights"][0 if task == "position" else 1]
        how = "dropped from the default" if tasks.get("weights_from") == "data" else "as configured"
        lines += [f"**{task} is constant in the train split**: loss weight {weight:g} ({how}); "
                  + ("the combined monitor leaves it out; " if task in tasks.get("monitor_ignores", []) else "")
                  + "its validation metrics say nothing about the model.", ""]

    if best is not None:
        how = "marked best by the trainer" if best.get("best") else "highest monitored value"
        monitor = f", monitor {best['monitor']:.4f}" if isinstance(best.get("monitor"), (int, float)) else ""
        lines += [f"## Best epoch: {best['epoch']} ({how}{monitor}; kept in best.pt)", ""]
        lines += _best_table(best.get("val") or {}) + [""]
    if confusion:
        lines += [f"### Position confusion, validation, epoch {shown['epoch']}", ""]
        lines += confusion_table(confusion, names, "position") + [""]
        lines += [f"![position confusion matrix, epoch {shown['epoch']}]({CONFUSION_FILE})", ""]
    lines += _predictions_lines(run_dir, config, best)
    lines += calibration.report_lines(run_dir)
    lines += _cam_lines(run_dir)

    lines += ["## Assessment", "", *(f"- {note}" for note in assess(records, best)), ""]
    tolerance = config_get(config, "tolerance", "grade_tolerance")
    lines += [f"## Latest epoch: {last['epoch']}" + (f" against epoch {prev['epoch']}" if prev else ""), "",
              f"Epochs recorded: {len(records)}"
              + (f"; lr {last['lr']:.3g}" if isinstance(last.get("lr"), (int, float)) else "")
              + (f", {last['time_s']:.1f} s" if isinstance(last.get("time_s"), (int, float)) else "") + "."
              + (f" Grade tolerance ±{tolerance}." if tolerance is not None else "")
              + " A validation change is shown only when it exceeds half the width of the 95 % interval.", ""]
    val, train = last.get("val") or {}, last.get("train") or {}
    if val or train:
        lines += _latest_table(train, val, ((prev or {}).get("val") or {}) if prev else None) + [""]
    if "grade_qwk" in val:
        lines += [QWK_NOTE, ""]

    prev_recall = ((prev or {}).get("val") or {}).get("position_recall") or {}
    if val.get("position_recall"):
        rows = [[name, format_value("r", train.get("position_recall", {}).get(name)),
                 format_value("r", val["position_recall"].get(name)),
                 format_value("r", prev_recall.get(name)) if prev else "—"] for name in names]
        lines += [f"### Per-class recall, epoch {last['epoch']}", ""]
        lines += md_table(["class", "train", "validation", "validation, previous epoch"], rows) + [""]
    if val.get("confusion") and last is not shown:
        lines += [f"### Position confusion, validation, epoch {last['epoch']} (latest)", ""]
        lines += confusion_table(val["confusion"], names, "position") + [""]
    lines += ["## Curves", "", f"![curves]({CURVES_FILE})", ""]
    path = run_dir / REPORT_FILE
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)
    write_html(path, run_dir / REPORT_HTML_FILE)  # report.html beside it, from the same markdown: every section shows in both
    return path
