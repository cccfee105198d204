"""The run report, written like the team's training logs: each epoch against the previous one.

`write_report(run_dir)` reads `metrics.jsonl` (one JSON object per epoch, written by train.py) and
`config.json` when present, and writes `report.md`, `curves.png` and `confusion_matrix.png`.
`format_epoch_table(record, previous)` is the table the trainer prints after each epoch.

Change % is (current - previous) / |previous| * 100, shown with an arrow (▲ up, ▼ down) and
whether that direction is better or worse for the metric; n/a when the previous value is 0 or absent.
The best epoch is the last record marked `"best": true`; failing that, the highest `"monitor"`
value (lowest when config.json says `monitor_mode: "min"`); failing that, the highest val macro-F1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from cornpipe.errors import ReportError
from cornpipe.runs.plots import plot_confusion, plot_curves

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
REPORT_FILE = "report.md"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion_matrix.png"

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
WIDE_CI = 0.20  # a 95% CI of position accuracy wider than this: the val set is too small to tell
CONFIG_SUMMARY_KEYS = ("model", "grade_head", "loader", "epochs", "batch_size", "image_size", "lr",
                       "optimizer", "oversample", "loss_weights", "device", "amp", "monitor", "seed")



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


def change_pct(current: float | None, previous: float | None) -> float | None:
    if current is None or previous is None or previous == 0:
        return None
    return (current - previous) / abs(previous) * 100.0


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


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _split_table(split: dict[str, Any], prev: dict[str, Any] | None, with_ci: bool) -> list[str]:
    header = ["metric", "current"] + (["95% CI"] if with_ci else []) + ["previous epoch", "change %"]
    ci = split.get("ci") or {}
    rows = []
    for key, label, higher in _metric_rows(split):
        before = (prev or {}).get(key)
        row = [label, format_value(key, split.get(key))]
        if with_ci:
            row.append(format_ci(ci.get(key)))
        row += [format_value(key, before) if prev else "—", format_change(split.get(key), before, higher)]
        rows.append(row)
    return _md_table(header, rows)


def _confusion_table(confusion: Sequence[Sequence[int]], names: Sequence[str]) -> list[str]:
    rows = [[f"**{names[i]}**", *(str(c) for c in row), str(sum(row))] for i, row in enumerate(confusion)]
    return _md_table(["true \\ predicted", *names, "total"], rows)


def assess(records: Sequence[dict[str, Any]], best: dict[str, Any] | None) -> list[str]:
    """Plain-language findings for the latest epoch, warnings first."""
    last = records[-1]
    train, val = last.get("train") or {}, last.get("val") or {}
    notes: list[str] = []
    for split_name, split in (("validation", val), ("training", train)):
        never = split.get("never_predicted") or []
        if never:
            notes.append(
                f"**WARNING: position class(es) {', '.join(f'`{n}`' for n in never)} never predicted on "
                f"{split_name} in epoch {last['epoch']}.** The model ignores them: oversample rare classes "
                "(`--oversample balanced`) and watch their recall below.")
    if len(records) >= 2:
        prev = records[-2]
        dt = change_pct(train.get("loss"), (prev.get("train") or {}).get("loss"))
        dv = change_pct(val.get("loss"), (prev.get("val") or {}).get("loss"))
        if dt is not None and dv is not None:
            if dt < 0 and dv > 0:
                notes.append(f"Possible overfitting: train loss fell {-dt:.1f}% while validation loss rose "
                             f"{dv:.1f}% since epoch {prev['epoch']}.")
            elif dt < 0 and dv < 0:
                notes.append(f"Improving: train loss fell {-dt:.1f}% and validation loss fell {-dv:.1f}% "
                             f"since epoch {prev['epoch']}.")
            elif dt > 0:
                notes.append(f"Train loss rose {dt:.1f}% since epoch {prev['epoch']}: the learning rate may be "
                             "too high or training unstable.")
        rising = 0
        for a, b in zip(records[-2::-1], records[::-1], strict=False):  # walk back from the latest
            va, vb = (a.get("val") or {}).get("loss"), (b.get("val") or {}).get("loss")
            ta, tb = (a.get("train") or {}).get("loss"), (b.get("train") or {}).get("loss")
            if None in (va, vb, ta, tb) or not (vb > va and tb < ta):
                break
            rising += 1
        if rising >= 2:
            notes.append(f"**Overfitting:** validation loss has risen for {rising} epochs in a row while train "
                         "loss kept falling; early stopping should restore the best checkpoint.")
    ci = (val.get("ci") or {}).get("position_accuracy")
    n = val.get("n_samples")
    size = f" ({n} images)" if n else ""
    if ci:
        width = ci[1] - ci[0]
        if width > WIDE_CI:
            notes.append(f"Validation set too small to tell{size}: the 95% CI of position accuracy is "
                         f"[{ci[0]:.2f}, {ci[1]:.2f}], {width * 100:.0f} points wide; epoch-to-epoch changes "
                         "smaller than that are noise.")
    elif val:
        notes.append(f"No confidence intervals recorded{size} (bootstrap off): treat small changes as noise.")
    if val and "grade_qwk" in val and val["grade_qwk"] is None:
        notes.append("Grade QWK is undefined this epoch: every true and predicted grade falls on one scale level.")
    if best is not None and best["epoch"] != last["epoch"]:
        notes.append(f"The best epoch so far is {best['epoch']}, {last['epoch'] - best['epoch']} epoch(s) "
                     "before the latest.")
    return notes or ["Nothing unusual: no class is ignored and the losses move together."]


def write_report(run_dir: Path | str) -> Path:
    """Write report.md, curves.png and confusion_matrix.png into `run_dir`; returns report.md's path."""
    run_dir = Path(run_dir)
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
        label = "best" if shown is best else "latest"
        plot_confusion(confusion, names, run_dir / CONFUSION_FILE,
                       f"Position confusion, validation, epoch {shown['epoch']} ({label})")

    lines = [f"# Training report: {run_dir.name}", ""]
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
    tolerance = config_get(config, "tolerance", "grade_tolerance")
    lines += [f"Epochs recorded: {len(records)}. Latest epoch: {last['epoch']}"
              + (f", lr {last['lr']:.3g}" if isinstance(last.get("lr"), (int, float)) else "")
              + (f", {last['time_s']:.1f} s" if isinstance(last.get("time_s"), (int, float)) else "") + "."
              + (f" Grade tolerance ±{tolerance}." if tolerance is not None else ""), ""]

    lines += ["## Assessment", "", *(f"- {note}" for note in assess(records, best)), ""]
    for title, key, with_ci in (("Train", "train", False), ("Validation", "val", True)):
        split = last.get(key) or {}
        if not split:
            continue
        lines += [f"## {title}, epoch {last['epoch']}" + (f" vs epoch {prev['epoch']}" if prev else ""), ""]
        lines += _split_table(split, (prev or {}).get(key) if prev else None, with_ci) + [""]
    if "grade_qwk" in (last.get("val") or {}):
        lines += [QWK_NOTE, ""]

    val, train = last.get("val") or {}, last.get("train") or {}
    prev_recall = ((prev or {}).get("val") or {}).get("position_recall") or {}
    if val.get("position_recall"):
        rows = [[name, format_value("r", train.get("position_recall", {}).get(name)),
                 format_value("r", val["position_recall"].get(name)),
                 format_value("r", prev_recall.get(name)) if prev else "—",
                 format_change(val["position_recall"].get(name), prev_recall.get(name), True)]
                for name in names]
        lines += ["## Per-class recall", ""]
        lines += _md_table(["class", "train", "val", "val previous epoch", "change %"], rows) + [""]
    if val.get("confusion"):
        lines += [f"## Position confusion matrix, validation, epoch {last['epoch']}", ""]
        lines += _confusion_table(val["confusion"], names) + [""]

    if best is not None:
        how = "marked best by the trainer" if best.get("best") else "highest monitored value"
        monitor = f", monitor {best['monitor']:.4f}" if isinstance(best.get("monitor"), (int, float)) else ""
        lines += [f"## Best epoch: {best['epoch']} ({how}{monitor})", ""]
        i = next(j for j, r in enumerate(records) if r is best)
        before = (records[i - 1].get("val") or {}) if i > 0 else None
        lines += _split_table(best.get("val") or {}, before, True) + [""]
        if best is not last and (best.get("val") or {}).get("confusion"):
            lines += _confusion_table(best["val"]["confusion"], names) + [""]
    lines += ["## Plots", "", f"![curves]({CURVES_FILE})", ""]
    if confusion:
        lines += [f"![position confusion matrix, epoch {shown['epoch']}]({CONFUSION_FILE})", ""]
    path = run_dir / REPORT_FILE
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)
    return path
