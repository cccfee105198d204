"""Cross-validation: the runs of `cornpipe cv` and their summary (which samples a fold holds: runs/folds.py).

On a small, imbalanced survey one validation split is not evidence. `cornpipe cv` trains the same config
once per fold (and per seed) over ALL converted samples, reading each fold's samples from whichever split
holds them (LoaderSpec.sample_ids): no re-conversion.

Folds (a pure function of the shard set, `folds`, `fold_group` and `fold_seed`; `fold_group` stage,
source or a metadata column, runs.groups) are cornpipe.runs.folds.

Summary (cv.json, cv.md, cv_confusion.png, oof_predictions.csv): one row per fold x seed with its best
epoch's validation metrics; per metric, across folds (each fold's mean over seeds first): mean, sd (n - 1)
and a 95 % t-interval of the mean; the spread across seeds (mean within-fold sd); per-position recall
across folds. Out of fold, where no sample counts twice: every run's best-epoch predictions
(RUN/val_predictions.csv) pooled into oof_predictions.csv with their seed and fold; per seed, the metrics
of its pooled predictions (each sample once) and its pooled confusion matrix (its runs' matrices added
up); the reported matrix is the per-seed matrices averaged over seeds, so it counts every sample once.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cornpipe.errors import ConfigError
from cornpipe.runs.config import TrainConfig
from cornpipe.runs.folds import fold_assignment, number_of_folds, uses_folds

SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    ("position_accuracy", "position accuracy"), ("position_macro_f1", "position macro-F1"),
    ("grade_mae", "grade MAE"), ("grade_within_tol", "grade within ±tol"), ("grade_qwk", "grade QWK"),
    ("loss", "total loss"))
OOF_METRICS = tuple(key for key, _ in SUMMARY_METRICS if key != "loss")  # from the pooled predictions
RESULT_FILE = "cv_result.json"  # written into a run folder when its training finished
CV_JSON, CV_MD, CV_CONFUSION, OOF_CSV = "cv.json", "cv.md", "cv_confusion.png", "oof_predictions.csv"
CV_HTML = "cv.html"  # cv.md as one self-contained page (runs/html_report.py)


# ---- running the folds ---------------------------------------------------------------------------------

def run_name(fold: int | None, seed: int) -> str:
    return f"seed{seed}" if fold is None else f"fold{fold}-seed{seed}"


def run_folds(base: TrainConfig, out: Path, samples: Sequence[dict], seeds: Sequence[int],
              train_fn: Callable[..., Any], log: Callable[[str], None], force: bool = False) -> dict[str, Any]:
    """Train every fold x seed into out/fold<i>-seed<s> (skipping finished runs, resuming killed ones),
    then write the summary. `train_fn(cfg, resume=, force=)` trains one run: cornpipe.train.train in this
    process, or the CLI's torchrun launcher (`--nproc N`); runs/ sits below train.py. What a run reached
    is read back from its best.pt, whichever way it ran. A rerun with another config is refused, or
    with `force` starts a new cv in `out` (cornpipe.runs.cv_dir)."""
    from cornpipe.runs.cv_dir import open_cv_dir, warn_small_folds

    folds: list[int | None] = list(range(number_of_folds(samples, base))) if uses_folds(base) else [None]
    if uses_folds(base):
        warn_small_folds(*fold_assignment(samples, base), samples, log)
    with open_cv_dir(out, base, force=force, log=log):  # one cv per folder, under one config
        return _run_all(base, out, folds, seeds, train_fn, log)


def _run_all(base: TrainConfig, out: Path, folds: list[int | None], seeds: Sequence[int],
             train_fn: Callable[..., Any], log: Callable[[str], None]) -> dict[str, Any]:
    from cornpipe.runs.checkpoint import BEST, LAST, load_checkpoint

    for fold in folds:
        for seed in seeds:
            cfg = dataclasses.replace(base, out=str(out / run_name(fold, seed)), seed=int(seed),
                                      fold=base.fold if fold is None else fold)
            run = Path(cfg.out)
            if (run / RESULT_FILE).is_file():
                log(f"{run.name}: finished earlier, skipped")
                continue
            resume = (run / LAST).is_file() or (run / BEST).is_file()  # best.pt alone: killed saving last.pt
            log(f"{run.name}: {'resuming' if resume else 'training'}")
            train_fn(cfg, resume=resume, force=run.exists() and not resume)
            best = load_checkpoint(run / BEST)
            (run / RESULT_FILE).write_text(json.dumps({
                "fold": fold, "seed": int(seed), "best_epoch": best["epoch"], "val": best["val"]}) + "\n")
    return write_summary(out, [(f, s) for f in folds for s in seeds])


# ---- the summary --------------------------------------------------------------------------------------

# the range each summarised metric can take: its interval is clipped to it (few folds and a large sd
# would otherwise give an accuracy interval below 0)
METRIC_RANGE: dict[str, tuple[float | None, float | None]] = {
    "position_accuracy": (0.0, 1.0), "position_macro_f1": (0.0, 1.0), "grade_within_tol": (0.0, 1.0),
    "position_recall": (0.0, 1.0), "grade_qwk": (-1.0, 1.0), "grade_mae": (0.0, None), "loss": (0.0, None)}


def interval(values: Sequence[float], metric: str | None = None) -> dict[str, Any]:
    """mean, sd (n - 1), and the 95 % t-interval of the mean of `values` (None where undefined),
    clipped to the range of `metric` (METRIC_RANGE)."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": None}
    mean = float(v.mean())
    if v.size < 2:
        return {"n": 1, "mean": mean, "sd": None, "ci95": None}
    from scipy.stats import t

    sd = float(v.std(ddof=1))
    half = float(t.ppf(0.975, v.size - 1)) * sd / math.sqrt(v.size)
    lo, hi = METRIC_RANGE.get(metric or "", (None, None))
    ci = [mean - half if lo is None else max(lo, mean - half), mean + half if hi is None else min(hi, mean + half)]
    return {"n": int(v.size), "mean": mean, "sd": sd, "ci95": ci}


def summarize_runs(rows: Sequence[dict[str, Any]], positions: Sequence[str]) -> dict[str, Any]:
    """Across-fold statistics of per-run results ({"fold", "seed", "val": metrics})."""
    by_fold: dict[int, list[dict]] = {}
    for row in rows:
        by_fold.setdefault(int(row["fold"]), []).append(row)

    def fold_means(get: Callable[[dict], float | None]) -> tuple[list[float | None], list[float]]:
        means, sds = [], []
        for runs in by_fold.values():
            values = [x for x in (get(r["val"]) for r in runs) if x is not None]
            means.append(float(np.mean(values)) if values else None)
            if len(values) > 1:
                sds.append(float(np.std(values, ddof=1)))
        return means, sds

    metrics = {}
    for key, _label in SUMMARY_METRICS:
        means, sds = fold_means(lambda m, key=key: m.get(key))
        metrics[key] = {**interval(means, key), "per_fold": means, "seed_sd": float(np.mean(sds)) if sds else None}
    recall = {}
    for name in positions:
        means, _ = fold_means(lambda m, name=name: (m.get("position_recall") or {}).get(name))
        recall[name] = {**interval(means, "position_recall"), "per_fold": means}
    # a seed's runs hold out disjoint folds: their best-epoch matrices add up to that seed's pooled
    # out-of-fold matrix (every sample once); averaged over seeds, no sample counts twice
    per_seed: dict[int, np.ndarray] = {}
    for row in rows:
        if row["val"].get("confusion") is not None:
            matrix = per_seed.setdefault(int(row["seed"]), np.zeros((len(positions),) * 2, dtype=np.int64))
            matrix += np.array(row["val"]["confusion"], dtype=np.int64)
    pooled = np.mean(list(per_seed.values()), axis=0) if per_seed else np.zeros((len(positions),) * 2)
    return {"folds": len(by_fold), "runs": len(rows), "metrics": metrics, "position_recall": recall,
            "pooled_confusion": pooled.tolist(), "seeds": sorted(per_seed),
            "confusion_per_seed": {str(seed): m.tolist() for seed, m in sorted(per_seed.items())}}


def pool_predictions(out: Path, rows: Sequence[dict[str, Any]], positions: Sequence[str],
                     grade_scale: Sequence[float], tolerance: float) -> dict[str, Any]:
    """out/oof_predictions.csv (every run's val_predictions.csv, with its seed, fold and run in front)
    and, per seed, the metrics of its pooled out-of-fold predictions (every sample once)."""
    from cornpipe.models.metrics import compute_metrics
    from cornpipe.runs.evaluation import prediction_columns
    from cornpipe.runs.run_dir import PREDICTIONS_FILE

    missing = [r["run"] for r in rows if not (out / r["run"] / PREDICTIONS_FILE).is_file()]
    if missing:  # runs trained before cornpipe wrote predictions
        return {"file": None, "missing": missing, "per_seed": [], "metrics": {}}
    pooled: list[dict[str, Any]] = []
    for r in rows:
        with (out / r["run"] / PREDICTIONS_FILE).open(newline="") as f:
            pooled += [{"seed": r["seed"], "fold": r["fold"], "fold_name": r["fold_name"] or "", "run": r["run"],
                        **record} for record in csv.DictReader(f)]
    with (out / OOF_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, ["seed", "fold", "fold_name", "run", *prediction_columns(positions)])
        writer.writeheader()
        writer.writerows(pooled)
    index = {str(p): i for i, p in enumerate(positions)}
    per_seed = []
    for seed in sorted({r["seed"] for r in rows}):
        mine = [p for p in pooled if p["seed"] == seed]
        twice = sorted(i for i, n in Counter(int(p["sample_id"]) for p in mine).items() if n > 1)[:5]
        if twice:
            raise ConfigError(f"seed {seed}: sample(s) {twice} were held out by two runs in {out}: "
                              "its runs do not share one fold assignment")
        m = compute_metrics([index[p["position_true"]] for p in mine],
                            [[float(p[f"prob_{name}"]) for name in positions] for p in mine],
                            [float(p["grade_true"]) for p in mine], [float(p["grade_pred"]) for p in mine],
                            grade_scale=grade_scale, positions=positions, tolerance=tolerance)
        per_seed.append({"seed": seed, "n_samples": m["n_samples"], **{k: m[k] for k in OOF_METRICS},
                         "confusion": m["confusion"]})
    return {"file": OOF_CSV, "missing": [], "per_seed": per_seed,
            "metrics": {k: interval([s[k] for s in per_seed], k) for k in OOF_METRICS}}


def write_summary(out: Path, runs: Sequence[tuple[int | None, int]]) -> dict[str, Any]:
    """cv.json, cv.md (and cv.html from it) and cv_confusion.png in `out` from its runs' cv_result.json and config.json.

    Runs without a fold (`cornpipe train --seeds`) are summarised across seeds: each seed is a "fold"."""
    from cornpipe.runs.breakdown import cv_section
    from cornpipe.runs.calibration import cv_calibration
    from cornpipe.runs.html_report import write_html
    from cornpipe.runs.plots import plot_confusion

    rows = []
    for i, (fold, seed) in enumerate(runs):
        run = out / run_name(fold, seed)
        result = json.loads((run / RESULT_FILE).read_text())
        config = json.loads((run / "config.json").read_text())
        data = config.get("data", {})
        rows.append({"run": run.name, "fold": i if fold is None else fold, "seed": seed, "fold_name": data.get("fold", {}).get("name"),
                     "n_train": data.get("counts", {}).get("train"), "n_val": data.get("counts", {}).get("val"),
                     "best_epoch": result["best_epoch"], "val": result["val"]})
    config = json.loads((out / rows[0]["run"] / "config.json").read_text())
    positions = config["data"]["positions"]
    oof = pool_predictions(out, rows, positions, config["data"]["grade_scale"], config["tolerance"])
    summary = {**summarize_runs(rows, positions), "positions": positions, "oof": oof,
               "rows": [{k: v for k, v in r.items() if k != "val"}
                        | {key: r["val"].get(key) for key, _ in SUMMARY_METRICS}
                        | {"position_recall": r["val"].get("position_recall")} for r in rows]}
    summary["calibration"], calibration_md = cv_calibration(out, oof["file"], positions)
    (out / CV_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    seeds = summary["seeds"]
    if len(seeds) > 1:  # the plot labels counts as integers: draw one seed's exact matrix, not the mean
        plot_confusion(summary["confusion_per_seed"][str(seeds[0])], positions, out / CV_CONFUSION,
                       f"out-of-fold confusion of seed {seeds[0]}, every sample once (cv.md: mean over seeds)")
    else:
        plot_confusion(summary["pooled_confusion"], positions, out / CV_CONFUSION,
                       "out-of-fold confusion, every sample once")
    (out / CV_MD).write_text(format_summary(summary) + cv_section(out, oof["file"], config) + calibration_md)
    write_html(out / CV_MD, out / CV_HTML)  # cv.html beside it, images embedded
    return summary


def _num(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _mean_sd(m: dict[str, Any] | None) -> str:
    if not m or m.get("mean") is None:
        return "—"
    return _num(m["mean"]) + ("" if m["sd"] is None else f" ± {_num(m['sd'])}")


def _ci(m: dict[str, Any]) -> str:
    return "—" if m["ci95"] is None else f"[{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"


def format_summary(summary: dict[str, Any]) -> str:
    keys = [k for k, _ in SUMMARY_METRICS]
    oof, seeds = summary["oof"], len(summary["seeds"])
    lines = [f"# Cross-validation: {summary['folds']} folds, {summary['runs']} runs", "",
             "Each row is one run's best epoch on its held-out fold.", "",
             "| run | fold | seed | train | val | best epoch | " + " | ".join(label for _, label in SUMMARY_METRICS) + " |",
             "|---" * (6 + len(keys)) + "|"]
    for r in summary["rows"]:
        lines.append(f"| {r['run']} | {r['fold_name'] or r['fold']} | {r['seed']} | {r['n_train']} | {r['n_val']} | "
                     f"{r['best_epoch']} | " + " | ".join(_num(r[k]) for k in keys) + " |")
    lines += ["", "## Across folds", "",
              "Mean ± sd over folds (each fold averaged over its seeds first); 95 % CI: t-interval of the mean "
              "over folds. Seed sd: the mean spread between seeds of one fold. Pooled OOF: the metric computed "
              "once over all out-of-fold predictions of a seed (every sample once, each weighing the same; "
              "the across-fold mean weighs each fold the same), mean ± sd over seeds.", "",
              "| metric | mean ± sd | 95 % CI | seed sd | pooled OOF |", "|---|---|---|---|---|"]
    for key, label in SUMMARY_METRICS:
        m = summary["metrics"][key]
        lines.append(f"| {label} | {_num(m['mean'])} ± {_num(m['sd'])} | {_ci(m)} | {_num(m['seed_sd'])} | "
                     f"{_mean_sd(oof['metrics'].get(key))} |")
    lines += ["", "## Position recall across folds", "", "| position | mean ± sd | 95 % CI | per fold |",
              "|---|---|---|---|"]
    for name, m in summary["position_recall"].items():
        lines.append(f"| {name} | {_num(m['mean'])} ± {_num(m['sd'])} | {_ci(m)} | "
                     + ", ".join(_num(v, 2) for v in m["per_fold"]) + " |")
    lines += ["", "## Pooled out-of-fold predictions", ""]
    if oof["file"] is None:
        lines += [f"Not available: {', '.join(oof['missing'])} have no val_predictions.csv (trained before "
                  "cornpipe wrote it); rerun those runs to get them.", ""]
    else:
        lines += [f"`{oof['file']}`: every run's best-epoch prediction for each sample it held out (columns seed, "
                  "fold, fold_name, run, then the run's `val_predictions.csv`); each sample appears once per seed. "
                  "The metrics of each seed's pooled predictions:", "",
                  "| seed | samples | " + " | ".join(label for k, label in SUMMARY_METRICS if k in OOF_METRICS) + " |",
                  "|---" * (2 + len(OOF_METRICS)) + "|"]
        lines += [f"| {s['seed']} | {s['n_samples']} | " + " | ".join(_num(s[k]) for k in OOF_METRICS) + " |"
                  for s in oof["per_seed"]]
        lines.append("")
    positions = summary["positions"]
    counted = (f"the matrices of the {seeds} seeds averaged (per seed in cv.json, `confusion_per_seed`)"
               if seeds > 1 else "one seed's runs added up")
    lines += ["## Pooled out-of-fold confusion (rows: true, columns: predicted)", "",
              f"Every run's best epoch on its held-out fold; each sample counted once: {counted}.", "",
              "| true \\ predicted | " + " | ".join(positions) + " |", "|---" * (len(positions) + 1) + "|"]
    for name, row in zip(positions, summary["pooled_confusion"], strict=True):
        lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in row) + " |")
    lines += ["", f"![pooled confusion]({CV_CONFUSION})" + (f" (seed {summary['seeds'][0]})" if seeds > 1 else ""), ""]
    return "\n".join(lines)
