"""report.md's plain-language findings: warnings first, epoch-to-epoch advice only beyond the noise.

A change is beyond noise when it exceeds half the width of the metric's 95 % bootstrap interval; the advice
("possible overfitting", "the learning rate may be too high") needs validation macro-F1 or accuracy to move
that far, so one noisy epoch of a small validation set raises no alarm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

JUDGED_METRICS = ("position_macro_f1", "position_accuracy")  # advice needs one of these beyond its noise
WIDE_CI = 0.20  # a 95% CI of position accuracy wider than this: the val set is too small to tell


def change_pct(current: float | None, previous: float | None) -> float | None:
    if current is None or previous is None or previous == 0:
        return None
    return (current - previous) / abs(previous) * 100.0


def half_width(ci: Sequence[float] | None) -> float | None:
    return None if not ci else (ci[1] - ci[0]) / 2


def _judged_change(val: dict[str, Any], prev_val: dict[str, Any]) -> tuple[str, float, float] | None:
    """(metric label, change, half-width of its interval) for the first judged metric with an interval."""
    for key in JUDGED_METRICS:
        half = half_width((val.get("ci") or {}).get(key))
        if half is not None and val.get(key) is not None and prev_val.get(key) is not None:
            return key.replace("position_", "").replace("macro_f1", "macro-F1"), val[key] - prev_val[key], half
    return None


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
        judged = _judged_change(val, prev.get("val") or {})
        if judged is not None:
            name, delta, half = judged
            moved = (f"validation {name} {'rose' if delta > 0 else 'fell'} {abs(delta):.3f} since epoch "
                     f"{prev['epoch']}, beyond the noise (±{half:.3f}, half its 95 % interval)")
            if abs(delta) <= half + 1e-9:
                notes.append(f"Changes since epoch {prev['epoch']} are within noise: validation {name} moved "
                             f"{delta:+.3f}, less than half its 95 % interval (±{half:.3f}).")
            elif delta > 0:
                notes.append(f"Improving: {moved}.")
            elif dt is not None and dv is not None and dt < 0 < dv:
                notes.append(f"Possible overfitting: train loss fell {-dt:.1f}% and validation loss rose "
                             f"{dv:.1f}%, and {moved}.")
            elif dt is not None and dt > 0:
                notes.append(f"Train loss rose {dt:.1f}% and {moved}: the learning rate may be too high "
                             "or training unstable.")
            else:
                notes.append(f"Worse: {moved}.")
        rising = 0
        for a, b in zip(records[-2::-1], records[::-1], strict=False):  # walk back from the latest
            va, vb = (a.get("val") or {}).get("loss"), (b.get("val") or {}).get("loss")
            ta, tb = (a.get("train") or {}).get("loss"), (b.get("train") or {}).get("loss")
            if None in (va, vb, ta, tb) or not (vb > va and tb < ta):
                break
            rising += 1
        if rising >= 2:
            if best is None:  # no monitor recorded: nothing to restore
                advice = "."
            elif best["epoch"] == last["epoch"]:  # restoring "the best" would change nothing
                advice = f", yet the monitored metric still improved: epoch {last['epoch']} is the best so far."
            else:
                advice = f"; early stopping should restore the best checkpoint (epoch {best['epoch']})."
            notes.append(f"**Overfitting:** validation loss has risen for {rising} epochs in a row while train "
                         f"loss kept falling{advice}")
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
        notes.append("Grade QWK is undefined this epoch: every true grade falls on one scale level, so there is "
                     "no grading to agree on.")
    if best is not None and best["epoch"] != last["epoch"]:
        notes.append(f"The best epoch so far is {best['epoch']}, {last['epoch'] - best['epoch']} epoch(s) "
                     "before the latest.")
    return notes or ["Nothing unusual: no class is ignored."]
