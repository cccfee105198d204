"""`cornpipe sweep`: a hyperparameter search over cross-validation folds, with Optuna.

Each trial samples a config from the search space (runs/sweep_space.py) and runs it as a cv folder,
DIR/trial-NNN (runs/cv.py run_folds: its lock, marker, skipping and resuming). After each fold the
fold's metric (its mean over seeds) is reported to Optuna; median pruning stops a trial whose fold
falls below the median of earlier trials at that fold. The objective is the mean over folds.

The study lives in DIR/sweep.journal (Optuna's JournalStorage): a rerun continues it, counting
finished trials towards --trials. A trial found running when the sweep starts was killed with its
sweep (the sweep folder's lock says no one else runs it): it is marked failed and retried with the
same parameters in its own folder, where run_folds skips its finished folds. A trial that fails
(a CornpipeError or a runtime error in training) is a failed row with its reason, never a lost sweep.

Written after every trial: DIR/sweep.md (trials best first, with mean ± sd and a 95 % interval of the
metric across folds) and DIR/best.toml (the best complete trial's config, for `cornpipe train --config`).
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cornpipe.errors import ConfigError, CornpipeError, install_hint
from cornpipe.runs.config import TrainConfig, to_toml
from cornpipe.runs.cv import RESULT_FILE, SUMMARY_METRICS, interval, run_name
from cornpipe.runs.cv_dir import _comparable
from cornpipe.runs.lock import LOCK_NAME, FolderLock
from cornpipe.runs.sweep_space import Param, suggest
from cornpipe.shards.atomic import check_can_create, check_not_an_input

STUDY_NAME = "cornpipe-sweep"  # one study per sweep folder: a rerun finds it by this name
JOURNAL, SWEEP_MARKER, BEST_TOML, SWEEP_MD = "sweep.journal", ".cornpipe-sweep", "best.toml", "sweep.md"
METRICS = tuple(key for key, _ in SUMMARY_METRICS)
LOWER_IS_BETTER = frozenset({"grade_mae", "loss"})
PRUNE_AFTER = 3  # complete trials before median pruning starts: a median of fewer says little


def trial_folder(number: int) -> str:
    return f"trial-{number:03d}"


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:
        raise ConfigError(f"cornpipe sweep needs optuna: {install_hint('sweep')}") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep words its own lines
    return optuna


def run_sweep(base: TrainConfig, out: Path, samples: Sequence[dict], seeds: Sequence[int], trials: int,
              space: Sequence[Param], train_fn: Callable[..., Any], log: Callable[[str], None],
              metric: str = "position_macro_f1") -> Any:
    """Run trials into `out` until the study holds `trials` finished ones; returns the Optuna study.
    `base` holds the fixed settings (its `folds`/`fold_group` choose the folds); `train_fn` trains one
    run as run_folds' does."""
    optuna = _optuna()
    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)} (got {metric!r})")
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1 (got {trials})")
    check_can_create(out)
    check_not_an_input([out], [base.shards, base.init_weights])
    with FolderLock(out, "sweep", log):
        _check_or_claim(out, base, space, metric, seeds)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        study = optuna.create_study(
            study_name=STUDY_NAME, storage=JournalStorage(JournalFileBackend(str(out / JOURNAL))),
            load_if_exists=True, direction="minimize" if metric in LOWER_IS_BETTER else "maximize",
            pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER, n_warmup_steps=0))
        _retry_killed(study, log)
        done = len(_counted(study))
        log(f"sweep {out}: {done} of {trials} trials finished earlier" if done else f"sweep {out}: {trials} trials")
        # a seed per call: a rerun must not draw the first trials' random parameters again
        study.sampler = optuna.samplers.TPESampler(seed=base.seed + len(study.trials))

        def objective(trial: Any) -> float:
            return _objective(trial, optuna, base, out, samples, seeds, space, train_fn, log, metric)

        def written(study: Any, trial: Any) -> None:
            _log_end(trial, metric, log)
            write_results(out, study, base, metric)

        if trials > done:
            study.optimize(objective, n_trials=trials - done, catch=(CornpipeError, RuntimeError),
                           callbacks=[written])
        write_results(out, study, base, metric)
    return study


def _counted(study: Any) -> list[Any]:
    """Trials that count towards --trials: finished, and not a killed one that was retried."""
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished() and not t.user_attrs.get("killed")]


def _retry_killed(study: Any, log: Callable[[str], None]) -> None:
    from optuna.trial import TrialState

    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        folder = t.user_attrs.get("folder") or trial_folder(t.number)
        storage.set_trial_user_attr(t._trial_id, "killed", True)
        storage.set_trial_user_attr(t._trial_id, "error", f"killed mid-run; retried in {folder}")
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"folder": folder})
        log(f"trial {t.number} was killed mid-run: retried with its parameters, resuming {folder}")


def _objective(trial: Any, optuna: Any, base: TrainConfig, out: Path, samples: Sequence[dict],
               seeds: Sequence[int], space: Sequence[Param], train_fn: Callable[..., Any],
               log: Callable[[str], None], metric: str) -> float:
    from cornpipe.runs.cv import run_folds
    from cornpipe.runs.folds import number_of_folds

    folder = trial.user_attrs.get("folder") or trial_folder(trial.number)
    trial.set_user_attr("folder", folder)
    params = {p.name: suggest(trial, p) for p in space}
    log(f"trial {trial.number} ({folder}): " + ", ".join(f"{k}={v!r}" for k, v in params.items()))
    fold_values: dict[int, list[float]] = {}

    def report(fold: int) -> None:
        values = fold_values[fold]
        trial.report(sum(values) / len(values), fold)
        trial.set_user_attr("fold_values", [sum(v) / len(v) for v in fold_values.values()])
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after fold {fold}: below the median of earlier trials")

    def train_and_report(cfg: TrainConfig, **kwargs: Any) -> None:
        train_fn(cfg, **kwargs)
        value = _run_value(Path(cfg.out), metric)
        fold_values.setdefault(cfg.fold, []).append(value)
        if len(fold_values[cfg.fold]) == len(seeds):
            report(cfg.fold)

    try:
        cfg = dataclasses.replace(base, out=str(out / folder), **params)
        for fold in range(number_of_folds(samples, cfg)):  # a retried trial: its finished folds are skipped, and count
            results = [out / folder / run_name(fold, s) / RESULT_FILE for s in seeds]
            if all(r.is_file() for r in results):
                fold_values[fold] = [_value(json.loads(r.read_text())["val"], metric) for r in results]
                report(fold)
        summary = run_folds(cfg, out / folder, samples, seeds, train_and_report, log)
    except optuna.TrialPruned:
        raise
    except Exception as exc:  # the row says why; run_sweep decides which kinds the sweep survives
        trial.set_user_attr("error", f"{type(exc).__name__}: " + " ".join(str(exc).split()))
        raise
    stats = summary["metrics"][metric]
    if stats["mean"] is None:
        raise ConfigError(f"no fold of {folder} gave a {metric}")
    trial.set_user_attr("fold_values", stats["per_fold"])
    return float(stats["mean"])


def _value(val: dict[str, Any], metric: str) -> float:
    value = val.get(metric)
    return float("nan") if value is None else float(value)


def _run_value(run: Path, metric: str) -> float:
    from cornpipe.runs.checkpoint import BEST, load_checkpoint

    return _value(load_checkpoint(run / BEST)["val"], metric)


def _log_end(trial: Any, metric: str, log: Callable[[str], None]) -> None:
    state = trial.state.name.lower()
    if state == "complete":
        log(f"trial {trial.number}: {metric} {trial.value:.4f} (mean over folds)")
    elif state == "pruned":
        log(f"trial {trial.number}: pruned after {len(trial.intermediate_values)} fold(s)")
    else:
        log(f"trial {trial.number}: failed: {trial.user_attrs.get('error', 'see the trial folder')}")


# ---- the sweep folder's marker -------------------------------------------------------------------------

def _check_or_claim(out: Path, base: TrainConfig, space: Sequence[Param], metric: str,
                    seeds: Sequence[int]) -> None:
    """A sweep folder holds one study: a rerun must ask for the same fixed settings, space, metric and seeds."""
    current = json.loads(json.dumps({"config": _comparable(base), "space": {p.name: p.as_dict() for p in space},
                                     "metric": metric, "seeds": [int(s) for s in seeds]}))
    marker = out / SWEEP_MARKER
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{marker} is unreadable ({exc}); give another --out") from None
        saved_sweep = {k: saved.get(k) for k in current}
        if saved_sweep != current:
            changed = _changes(saved_sweep, current)
            raise ConfigError(f"{out} holds a sweep started with other settings ({changed}); rerun it with the "
                              "options it started with to continue it, or give another --out")
        return
    if any(p.name != LOCK_NAME for p in out.iterdir()):
        raise ConfigError(f"{out} is not a sweep folder cornpipe made (no {SWEEP_MARKER}) and is not empty; "
                          "sweep never writes into it: give another --out")
    marker.write_text(json.dumps({"sweep_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                  **current}) + "\n")


def _changes(saved: dict[str, Any], current: dict[str, Any]) -> str:
    parts = []
    for key in current:
        if saved.get(key) == current[key]:
            continue
        if key == "config" and isinstance(saved.get(key), dict):
            old, new = saved[key], current[key]
            parts += [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                      if old.get(k) != new.get(k)]
        else:
            parts.append(f"{key} {saved.get(key)!r} -> {current[key]!r}")
    return ", ".join(parts)


# ---- results: sweep.md and best.toml ------------------------------------------------------------------

def trial_rows(study: Any, metric: str) -> list[dict[str, Any]]:
    """One row per trial, best first: complete trials by their mean, then pruned, then failed ones."""
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    order = {"complete": 0, "pruned": 1, "fail": 2}
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = t.state.name.lower()
        stats = interval(t.user_attrs.get("fold_values") or [], metric)
        rows.append({"number": t.number, "state": "failed" if state == "fail" else state, "params": t.params,
                     "folder": t.user_attrs.get("folder", trial_folder(t.number)), "stats": stats,
                     "reason": t.user_attrs.get("error", ""), "key": (
                         order.get(state, 3), sign * stats["mean"] if stats["mean"] is not None else 0.0, t.number)})
    return sorted(rows, key=lambda r: r["key"])


def format_sweep(rows: Sequence[dict[str, Any]], metric: str, folds: int) -> str:
    label = dict(SUMMARY_METRICS)[metric]
    lines = [f"# Sweep: {len(rows)} trials over {folds} folds, {label}", "",
             f"Best first. Mean ± sd of the {label} over folds (each fold averaged over its seeds); 95 % CI: "
             "t-interval of the mean over folds. A pruned trial stopped after the folds shown; a failed one "
             "says why.", "",
             "| trial | state | mean ± sd | 95 % CI | folds | params | folder | reason |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["stats"]
        mean = "—" if s["mean"] is None else f"{s['mean']:.3f}" + ("" if s["sd"] is None else f" ± {s['sd']:.3f}")
        ci = "—" if s["ci95"] is None else f"[{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"
        params = ", ".join(f"{k}={_short(v)}" for k, v in r["params"].items())
        reason = r["reason"].replace("|", "\\|")
        lines.append(f"| {r['number']} | {r['state']} | {mean} | {ci} | {s['n']} | {params} | {r['folder']} | "
                     f"{reason} |")
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_config(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """The config `cornpipe train --config` takes: the fixed settings with the trial's, on the whole
    convert-time split (no fold) and without a run folder (train's --out gives it)."""
    return dataclasses.replace(base, **params, out="", folds=0, fold=0, fold_group="none")


def write_results(out: Path, study: Any, base: TrainConfig, metric: str) -> None:
    rows = trial_rows(study, metric)
    (out / SWEEP_MD).write_text(format_sweep(rows, metric, base.folds))
    best = next((r for r in rows if r["state"] == "complete"), None)
    if best is None:
        return
    text = to_toml(best_config(base, best["params"]))
    body = "\n".join(line for line in text.splitlines()[1:] if not line.startswith("out = "))
    s = best["stats"]
    (out / BEST_TOML).write_text(
        f"# cornpipe train --config {BEST_TOML} --out RUN: trial {best['number']} of the sweep in {out}, "
        f"{metric} {s['mean']:.4f} mean over {s['n']} folds\n" + body + "\n")
