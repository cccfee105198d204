"""Recipe benchmark: several training recipes over the same cv folds and seeds of one shard set, one table.

    python -m cornpipe.bench.recipes SHARDS --out DIR --recipes RECIPES.toml [--folds 3 --seeds 0,1]
        [--only NAME,NAME] [--metadata origin] [--against NAME]

The recipes file is TOML: a `[base]` table of `cornpipe train` settings every recipe shares, then one
`[[recipe]]` per row: `name`, the settings it changes (any `cornpipe train` config key) and optionally
`tta = true` (also evaluate every fold's best.pt with its mirror averaged, `cornpipe evaluate --tta`) and
`baseline = true` (the row the others are compared with; default the first). String values expand
environment variables, so a machine-specific weights file can be `init_weights = "$LITE0"`.

Each recipe is a `cornpipe cv SHARDS --out DIR/NAME --config DIR/NAME.toml` (a subprocess: exactly what a
user runs; a rerun after a kill resumes it, and cv refuses a changed recipe under the same name), so every
recipe sees the same folds and seeds. DIR/recipes.md then has, per recipe: position macro-F1 and accuracy
as mean ± sd over folds with the cv's 95 % t-interval, the pooled out-of-fold macro-F1, and the paired
difference in macro-F1 from the baseline over the same (fold, seed) runs with its 95 % t-interval: the
runs share their folds, so the paired interval is the one that can tell two recipes apart (`--against NAME`
adds a second such column: against the recipe the others each change one setting of, say). With
`--metadata KEY` (a manifest column such as origin), out-of-fold accuracy per value of KEY, with a
percentile bootstrap interval, and its difference from the baseline's on the same samples (paired
bootstrap over the samples). DIR/recipes.json holds the same numbers.

Every fold's best epoch is chosen on that fold's own validation, so every figure is optimistic by the
same selection for every recipe; the differences are what the table is for.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cornpipe.errors import BenchError, CornpipeError

RESAMPLES = 1000
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 14: 2.145, 19: 2.093, 29: 2.045}  # two-sided 95 % t quantiles by degrees of freedom
RESERVED = {"folds", "fold", "fold_group", "fold_seed", "seed", "out", "shards"}  # the benchmark sets these


def t95(df: int) -> float:
    """The two-sided 95 % t quantile for `df` degrees of freedom (the nearest tabulated df at or below)."""
    return T95[max(k for k in T95 if k <= df)] if df < 30 else 1.96


def load_recipes(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(base settings, recipes) from a recipes TOML; each recipe: name, settings, tta, baseline."""
    from cornpipe.runs.config import TrainConfig, load_toml

    try:
        data = load_toml(path)
    except CornpipeError as exc:
        raise BenchError(f"recipes: {exc}") from exc
    base, recipes = _expand(data.get("base", {})), []
    for i, raw in enumerate(data.get("recipe", [])):
        raw = dict(raw)
        name = str(raw.pop("name", "")).strip()
        if not name or "/" in name or name.startswith("."):
            raise BenchError(f"recipe {i + 1} in {path} needs a plain `name` (a folder name)")
        tta, baseline = bool(raw.pop("tta", False)), bool(raw.pop("baseline", False))
        recipes.append({"name": name, "settings": _expand(raw), "tta": tta, "baseline": baseline})
    if not recipes:
        raise BenchError(f"{path} has no [[recipe]]")
    names = [r["name"] for r in recipes]
    if len(set(names)) != len(names):
        raise BenchError(f"recipe names repeat in {path}: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    clash = sorted(RESERVED & (set(base) | {k for r in recipes for k in r["settings"]}))
    if clash:
        raise BenchError(f"{', '.join(clash)}: set by the benchmark (--folds, --seeds, --fold-seed), not a recipe")
    for r in recipes:  # every recipe is a valid training config before hours of training start
        try:
            TrainConfig.from_dict({**base, **r["settings"]}, source=f"{path} recipe {r['name']}")
        except CornpipeError as exc:
            raise BenchError(str(exc)) from exc
    if not any(r["baseline"] for r in recipes):
        recipes[0]["baseline"] = True
    return base, recipes


def _expand(settings: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in settings.items():
        if isinstance(value, str):
            value = os.path.expandvars(value)
            if "$" in value:
                raise BenchError(f"{key} = {value!r}: an environment variable in it is not set")
        out[key] = value
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def run_recipe(shards: Path, out: Path, recipe: dict[str, Any], base: dict[str, Any], *, folds: int,
               seeds: Sequence[int], fold_seed: int) -> Path:
    """`cornpipe cv` of one recipe into out/NAME (resumed when a run was killed); its cv folder."""
    settings = {**base, **recipe["settings"]}
    config = out / f"{recipe['name']}.toml"
    config.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items()), encoding="utf-8")
    cv_dir = out / recipe["name"]
    cmd = [sys.executable, "-m", "cornpipe", "cv", str(shards), "--out", str(cv_dir), "--folds", str(folds),
           "--seeds", ",".join(map(str, seeds)), "--fold-seed", str(fold_seed), "--config", str(config)]
    print(f"[{time.strftime('%H:%M:%S')}] {recipe['name']}: {' '.join(cmd[2:])}", flush=True)
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"recipe {recipe['name']}: cornpipe cv failed: {last}")
    return cv_dir


def tta_rows(cv_dir: Path, shards: Path) -> list[dict[str, str]]:
    """Every run's best.pt evaluated on its own val fold with the mirror averaged: predictions with seed."""
    from cornpipe.runs.model_eval import EVAL_PREDICTIONS_FILE, evaluate_model

    rows: list[dict[str, str]] = []
    for run in sorted(p for p in cv_dir.iterdir() if (p / "best.pt").is_file()):
        seed = json.loads((run / "config.json").read_text())["seed"]
        out = run / "tta"
        if not (out / EVAL_PREDICTIONS_FILE).is_file():
            evaluate_model(run, shards, out, split="val", tta=True, device="cpu", bootstrap=0)
        with (out / EVAL_PREDICTIONS_FILE).open(newline="", encoding="utf-8") as f:
            rows += [{**r, "seed": str(seed), "run": run.name} for r in csv.DictReader(f)]
    return rows


def macro_f1(true: Sequence[str], pred: Sequence[str]) -> float:
    """Macro-F1 over the classes present in `true` (a class never true and never predicted is not scored)."""
    scores = []
    for c in sorted(set(true)):
        tp = sum(t == c and p == c for t, p in zip(true, pred, strict=True))
        fp = sum(t != c and p == c for t, p in zip(true, pred, strict=True))
        fn = sum(t == c and p != c for t, p in zip(true, pred, strict=True))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else float("nan")


def per_run_f1(rows: Sequence[dict[str, str]]) -> dict[str, float]:
    """Macro-F1 of each run's predictions (run folder name -> F1)."""
    by_run: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_run.setdefault(r["run"], []).append(r)
    return {run: macro_f1([r["position_true"] for r in rs], [r["position_pred"] for r in rs])
            for run, rs in by_run.items()}


def oof_rows(cv_dir: Path) -> list[dict[str, str]]:
    """The cv's pooled out-of-fold predictions (oof_predictions.csv: seed, fold, run, the prediction columns)."""
    from cornpipe.runs.cv import OOF_CSV

    with (cv_dir / OOF_CSV).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def group_accuracy(rows: Sequence[dict[str, str]], values: dict[int, str], seed: int = 0) -> dict[str, Any]:
    """Out-of-fold accuracy per metadata value (sample_id -> value), every seed's prediction of a sample
    counted, with a percentile bootstrap over samples."""
    by_value: dict[str, dict[int, list[bool]]] = {}
    for r in rows:
        value = values.get(int(r["sample_id"]), "unknown")
        by_value.setdefault(value, {}).setdefault(int(r["sample_id"]), []).append(r["position_true"] == r["position_pred"])
    rng = np.random.default_rng(seed)
    out = {}
    for value, samples in sorted(by_value.items()):
        acc = np.array([np.mean(v) for v in samples.values()])  # per sample: the share of its seeds right
        boot = acc[rng.integers(0, len(acc), size=(RESAMPLES, len(acc)))].mean(1) if len(acc) >= 10 else None
        out[value] = {"n": len(acc), "accuracy": float(acc.mean()), "ci95": _percentiles(boot),
                      "correct": {str(k): float(np.mean(v)) for k, v in samples.items()}}
    return out


def _percentiles(boot: np.ndarray | None) -> list[float] | None:
    return None if boot is None else [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def paired_groups(groups: dict[str, Any], base: dict[str, Any], seed: int = 0) -> None:
    """Adds `delta` to each metadata value: its accuracy minus the baseline's on the same samples, with a
    percentile bootstrap over those samples (paired: each sample's share right in both recipes)."""
    rng = np.random.default_rng(seed)
    for value, g in groups.items():
        other = base.get(value, {}).get("correct", {})
        shared = sorted(set(g["correct"]) & set(other))
        d = np.array([g["correct"][k] - other[k] for k in shared])
        boot = d[rng.integers(0, len(d), size=(RESAMPLES, len(d)))].mean(1) if len(d) >= 10 else None
        g["delta"] = {"mean": float(d.mean()) if len(d) else None, "ci95": _percentiles(boot), "n": len(d)}


def paired(diff: Sequence[float]) -> dict[str, Any]:
    """Mean and 95 % t-interval of paired differences."""
    d = np.asarray(diff, dtype=np.float64)
    if len(d) < 2:
        return {"mean": float(d.mean()) if len(d) else None, "ci95": None, "n": len(d)}
    half = t95(len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return {"mean": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)], "n": len(d)}


def summarize_recipe(cv_dir: Path, shards: Path, recipe: dict[str, Any], metadata: str | None,
                     values: dict[int, str]) -> dict[str, Any]:
    """One recipe's numbers: cv.json's across-fold metrics, pooled OOF macro-F1, per-run F1 (for pairing),
    per-metadata accuracy, and the same from the TTA evaluation when the recipe asks for it."""
    from cornpipe.runs.cv import CV_JSON

    cv = json.loads((cv_dir / CV_JSON).read_text())
    metrics = {key: {k: cv["metrics"][key].get(k) for k in ("mean", "sd", "ci95")}
               for key in ("position_macro_f1", "position_accuracy")}
    rows = oof_rows(cv_dir)
    result = {"name": recipe["name"], "settings": recipe["settings"], "cv": metrics, "folds": cv["folds"],
              "runs": cv["runs"], "best_epochs": [r["best_epoch"] for r in cv["rows"]],
              "oof_macro_f1": cv["oof"]["metrics"].get("position_macro_f1", {}).get("mean"),
              "run_f1": per_run_f1(rows)}
    if metadata:
        result["by_" + metadata] = group_accuracy(rows, values)
    if recipe["tta"]:
        tta = tta_rows(cv_dir, shards)
        result["tta"] = {"run_f1": per_run_f1(tta), **({"by_" + metadata: group_accuracy(tta, values)} if metadata else {})}
    return result


def compare(results: Sequence[dict[str, Any]], baseline: str, against: str | None = None) -> None:
    """Adds `vs_baseline` (paired macro-F1 differences over the shared runs) to each result (and its TTA), and
    `vs_against`: the same against a second recipe (`--against`, e.g. the one the others each change)."""
    first = next(r for r in results if r["name"] == baseline)
    second = next((r for r in results if r["name"] == against), None)
    for r in results:
        for part in (r, r.get("tta")):
            if part is None:
                continue
            for name, other in (("vs_baseline", first), ("vs_against", second)):
                if other is not None:
                    shared = sorted(set(other["run_f1"]) & set(part["run_f1"]))
                    part[name] = paired([part["run_f1"][k] - other["run_f1"][k] for k in shared])
            for key in [k for k in part if k.startswith("by_")]:  # per metadata value, paired over samples
                paired_groups(part[key], first[key])


def _f(x: float | None, signed: bool = False) -> str:
    return "—" if x is None else (f"{x:+.3f}" if signed else f"{x:.3f}")


def _ci(ci: Sequence[float] | None, signed: bool = False) -> str:
    return "—" if not ci else f"[{_f(ci[0], signed)}, {_f(ci[1], signed)}]"


def _delta(part: dict[str, Any], key: str) -> str:
    d = part.get(key)
    return "—" if not d or d["mean"] is None else f"{_f(d['mean'], True)} {_ci(d['ci95'], True)}"


def format_table(results: Sequence[dict[str, Any]], baseline: str, metadata: str | None,
                 against: str | None = None) -> str:
    """recipes.md: one row per recipe (and per recipe's TTA evaluation)."""
    groups = sorted({v for r in results for v in r.get("by_" + metadata, {})}) if metadata else []
    head = ["recipe", "changes from base", "macro-F1 mean ± sd [95 % CI]", "accuracy mean ± sd",
            "pooled OOF macro-F1", f"Δ macro-F1 vs {baseline} [95 % CI, paired]"]
    head += [f"Δ vs {against} [95 % CI, paired]"] if against else []
    head += ["best epochs"]
    head += [f"{metadata}={g} accuracy [95 % CI]" for g in groups]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        f1, acc = r["cv"]["position_macro_f1"], r["cv"]["position_accuracy"]
        changes = ", ".join(f"{k}={v}" for k, v in r["settings"].items() if k != "init_weights") or "—"
        cells = [r["name"], changes, f"{_f(f1['mean'])} ± {_f(f1['sd'])} {_ci(f1['ci95'])}",
                 f"{_f(acc['mean'])} ± {_f(acc['sd'])}", _f(r["oof_macro_f1"]),
                 "—" if r["name"] == baseline else _delta(r, "vs_baseline")]
        cells += (["—" if r["name"] == against else _delta(r, "vs_against")] if against else [])
        cells += [",".join(map(str, r["best_epochs"]))]
        cells += [_group_cell(r.get("by_" + metadata, {}).get(g)) for g in groups]
        lines.append("| " + " | ".join(cells) + " |")
        if r.get("tta"):
            t, runs = r["tta"], list(r["tta"]["run_f1"].values())
            cells = [f"{r['name']} + TTA", "mirror-averaged evaluation of the same runs",
                     f"{_f(float(np.mean(runs)))} (run mean)", "—", "—", _delta(t, "vs_baseline")]
            cells += ([_delta(t, "vs_against")] if against else []) + ["same"]
            cells += [_group_cell(t.get("by_" + metadata, {}).get(g)) for g in groups]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _group_cell(g: dict[str, Any] | None) -> str:
    if not g:
        return "—"
    delta = g.get("delta") or {}
    shift = f", Δ {_f(delta['mean'], True)} {_ci(delta.get('ci95'), True)}" if delta.get("mean") else ""
    return f"{_f(g['accuracy'])} {_ci(g['ci95'])} (n={g['n']}{shift})"


def metadata_values(shards: Path, key: str | None) -> dict[int, str]:
    """sample id -> the manifest's value of `key` (a metadata column, stage or source)."""
    if not key:
        return {}
    from cornpipe.shards.fields import sample_value

    manifest = json.loads((shards / "manifest.json").read_text())
    if key not in ("stage", "source") and key not in manifest.get("metadata", []):
        raise BenchError(f"--metadata {key!r} is not a column of {shards} "
                         f"(metadata: {', '.join(manifest.get('metadata', [])) or 'none'})")
    return {int(s["id"]): str(sample_value(s, key) or "unknown") for s in manifest["samples"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cornpipe.bench.recipes", description=__doc__.split("\n")[0])
    parser.add_argument("shards", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipes", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--fold-seed", type=int, default=0)
    parser.add_argument("--only", default=None, help="comma-separated recipe names (the baseline always runs)")
    parser.add_argument("--metadata", default=None, help="a manifest column: OOF accuracy per value")
    parser.add_argument("--against", default=None, help="a second recipe to give paired differences from")
    args = parser.parse_args(argv)
    import cornpipe.runs.model_eval  # noqa: F401  # now: the TTA step hours later runs the code this process started with
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        base, recipes = load_recipes(args.recipes)
        baseline = next(r["name"] for r in recipes if r["baseline"])
        if args.against and args.against not in {r["name"] for r in recipes}:
            raise BenchError(f"--against: no recipe named {args.against}")
        if args.only:
            wanted = {n.strip() for n in args.only.split(",")} | {baseline} | ({args.against} if args.against else set())
            unknown = wanted - {r["name"] for r in recipes}
            if unknown:
                raise BenchError(f"--only: no recipe named {', '.join(sorted(unknown))}")
            recipes = [r for r in recipes if r["name"] in wanted]
        values = metadata_values(args.shards, args.metadata)
        args.out.mkdir(parents=True, exist_ok=True)
        results = []
        for recipe in recipes:
            cv_dir = run_recipe(args.shards, args.out, recipe, base, folds=args.folds, seeds=seeds,
                                fold_seed=args.fold_seed)
            results.append(summarize_recipe(cv_dir, args.shards, recipe, args.metadata, values))
            compare(results, baseline, args.against)  # the table so far, after every recipe: a kill loses nothing written
            (args.out / "recipes.json").write_text(json.dumps({"base": base, "results": results}, indent=2) + "\n")
            (args.out / "recipes.md").write_text(format_table(results, baseline, args.metadata, args.against), encoding="utf-8")
    except BenchError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(f"-> {args.out / 'recipes.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
