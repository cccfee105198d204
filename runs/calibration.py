"""Calibration of the position head: temperature scaling fitted on validation, ECE, a reliability diagram.

One scalar T > 0 divides the position logits before the softmax; it is the T that minimises the negative
log-likelihood of the validation predictions (Guo et al. 2017). It never changes the predicted class (the
argmax), only how sure the probabilities say the model is. best.pt keeps the best epoch's softmax
probabilities, not its logits; log(probabilities) are the logits up to a per-row constant, which the
softmax ignores, so softmax(log(p) / T) is exactly softmax(logits / T).

When training ends the trainer fits T on best.pt's validation predictions and stores

    best.pt data["calibration"] = {"temperature": T, "ece_before": .., "ece_after": .., "n": N,
                                   "fitted": bool, "reason": why T = 1 when not fitted (else None)}

predict, load_model, evaluate and export apply it (raw probabilities on request). A validation set with
fewer than MIN_SAMPLES samples, or with fewer than two classes present, is too small to fit T; one without a
single error cannot fit it either (the NLL falls all the way to T -> 0), nor can one whose fit runs to a bound
of T_BOUNDS: T stays 1 and the report says why. ECE: ECE_BINS equal-width bins of the top-label confidence, the |accuracy - confidence|
gap of each bin weighted by its share of samples.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

MIN_SAMPLES = 50  # below this, one T fitted on validation says more about those images than about the model
ECE_BINS = 15
T_BOUNDS = (0.05, 20.0)  # the search interval; a T at a bound is reported as such
CALIBRATION_FILE = "calibration.png"
_TINY = np.finfo(np.float32).tiny  # a softmax that underflowed to 0 still has a finite log


def logits_from_probs(prob: Any) -> np.ndarray:
    """Softmax probabilities (N, P) -> logits up to a per-row constant (what temperature scaling needs)."""
    return np.log(np.clip(np.asarray(prob, dtype=np.float64), _TINY, None))


def scaled_softmax(logits: Any, temperature: float) -> np.ndarray:
    """softmax(logits / T), row-wise, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def apply_temperature(prob: Any, temperature: float) -> np.ndarray:
    """Calibrated probabilities from raw softmax probabilities (N, P); T == 1 gives them back unchanged."""
    prob = np.asarray(prob)
    if temperature == 1.0:
        return prob
    return scaled_softmax(logits_from_probs(prob), temperature).astype(prob.dtype)


def nll(logits: Any, labels: Any, temperature: float) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    labels = np.asarray(labels, dtype=np.int64)
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: Any, labels: Any, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The T in `bounds` minimising nll(logits, labels, T): a golden-section search on log T (the NLL of
    logits / T is unimodal in T; 100 steps narrow the interval far below float32's resolution)."""
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    for _ in range(100):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, labels, math.exp(b))
    return float(math.exp((lo + hi) / 2))


def reliability_bins(prob: Any, labels: Any, bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: mean confidence, accuracy and count (NaN where a bin is empty)."""
    prob = np.asarray(prob, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    confidence = prob.max(axis=1)
    correct = (prob.argmax(axis=1) == labels).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)  # (k/B, (k+1)/B]
    count = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(index, confidence, minlength=bins) / count
        acc = np.bincount(index, correct, minlength=bins) / count
    return conf, acc, count


def ece(prob: Any, labels: Any, bins: int = ECE_BINS) -> float:
    """Expected calibration error (top label, `bins` equal-width bins)."""
    conf, acc, count = reliability_bins(prob, labels, bins)
    filled = count > 0
    return float(np.sum(count[filled] * np.abs(acc[filled] - conf[filled])) / max(count.sum(), 1))


def calibrate(prob: Any, labels: Any, min_samples: int = MIN_SAMPLES) -> dict[str, Any]:
    """Fit T on raw softmax probabilities (N, P) and their true classes; the record best.pt keeps."""
    prob, labels = np.asarray(prob, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    n, present = len(labels), len(np.unique(labels))
    reason = None
    if n < min_samples:
        reason = f"{n} validation samples, fewer than the {min_samples} a temperature needs"
    elif present < 2:
        reason = f"only {present} position class present in validation; a temperature needs two or more"
    elif (prob.argmax(axis=1) == labels).all():
        # with no error to weigh, the NLL keeps falling as T -> 0: no temperature is identifiable
        reason = (f"every one of the {n} validation predictions is correct, so no temperature can be fitted "
                  "(sharpening would always look better)")
    temperature = 1.0 if reason else fit_temperature(logits_from_probs(prob), labels)
    if not reason and not (T_BOUNDS[0] * 1.01 < temperature < T_BOUNDS[1] / 1.01):
        reason = f"the fit ran to the search bound (T = {temperature:.3g}): validation does not pin T down"
        temperature = 1.0
    before = ece(prob, labels) if n else None
    after = ece(apply_temperature(prob, temperature), labels) if n else None
    return {"temperature": temperature, "ece_before": before, "ece_after": after, "n": n,
            "fitted": reason is None, "reason": reason}


def temperature_of(data: dict[str, Any]) -> float:
    """The temperature a checkpoint's data block holds (1.0: none fitted, or a checkpoint from before)."""
    value = (data.get("calibration") or {}).get("temperature", 1.0)
    return float(value) if isinstance(value, (int, float)) and value > 0 else 1.0


def calibrate_run(run: Path, min_samples: int = MIN_SAMPLES) -> dict[str, Any] | None:
    """Fit T on RUN/best.pt's validation predictions and write it into best.pt's data block (atomically);
    returns the record, or None when best.pt holds no predictions (a checkpoint from before they were kept)."""
    from cornpipe.runs.checkpoint import BEST, load_checkpoint, save_checkpoint

    state = load_checkpoint(Path(run) / BEST)
    predictions = state.get("val_predictions")
    if not predictions:
        return None
    record = calibrate(predictions["position_prob"].numpy(), predictions["position_true"].numpy(), min_samples)
    state["data"]["calibration"] = record
    save_checkpoint(state, Path(run) / BEST)
    return record


def plot_reliability(prob: Any, labels: Any, temperature: float, path: Path, title: str) -> Path:
    """A reliability diagram: accuracy against confidence per bin, before and after T, with the diagonal."""
    from cornpipe.runs.plots import plt

    edges = np.linspace(0, 1, ECE_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(5.2, 5.8))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for shown, label, colour in ((prob, "raw", "tab:red"),
                                 (apply_temperature(prob, temperature), f"calibrated (T = {temperature:.3g})",
                                  "tab:blue")):
        conf, acc, count = reliability_bins(shown, labels)
        filled = count > 0
        ax.plot(conf[filled], acc[filled], marker="o", color=colour,
                label=f"{label}, ECE {ece(shown, labels):.3f}")
    _, _, count = reliability_bins(prob, labels)
    share = count / max(count.sum(), 1)
    ax.bar(centres, share, width=1 / ECE_BINS, color="lightgrey", alpha=0.6, label="share of samples (raw)")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-class probability)", ylabel="accuracy", title=title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8)  # below: off the points
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def section_lines(record: dict[str, Any] | None, prob: Any, labels: Any, folder: Path, what: str,
                  image: str = CALIBRATION_FILE) -> list[str]:
    """The report's "Calibration" section (markdown) for a calibration record, drawing folder/`image`."""
    lines = ["## Calibration", ""]
    if record is None:
        return lines + [f"Not fitted: {what} has no per-sample validation predictions.", ""]
    temperature = float(record["temperature"])
    if record.get("fitted"):
        sense = ("over-confident: probabilities are softened" if temperature > 1
                 else "under-confident: probabilities are sharpened")
        lines += [f"Temperature scaling fitted on {what} ({record['n']} samples): **T = {temperature:.3f}**"
                  f" (the raw model was {sense}). predict, evaluate and export divide the position "
                  "logits by T before the softmax; `--raw-probs` gives the uncalibrated probabilities. "
                  "The predicted class never changes; val_predictions.csv keeps the raw probabilities. "
                  "The calibrated ECE is measured on the images T was fitted on, so it is optimistic.", ""]
    else:
        few = ", measured on too few images to trust" if (record.get("n") or 0) < MIN_SAMPLES else ""
        lines += [f"**Not fitted, T = 1**: {record.get('reason')}. The probabilities are the raw softmax; "
                  f"the ECE below is the raw one{few}.", ""]
    lines += ["| | ECE (15 bins, top label) |", "|---|---|",
              f"| raw | {_num(record.get('ece_before'))} |",
              f"| calibrated (T = {temperature:.3g}) | {_num(record.get('ece_after'))} |", ""]
    if record.get("n"):
        plot_reliability(prob, labels, temperature, folder / image, f"Reliability, {what}")
        lines += [f"![reliability diagram]({image})", ""]
    return lines


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "—"


def report_lines(run_dir: Path) -> list[str]:
    """The run report's Calibration section from RUN/best.pt (its record and validation predictions)."""
    from cornpipe.errors import CheckpointError
    from cornpipe.runs.checkpoint import BEST, load_checkpoint

    try:
        state = load_checkpoint(run_dir / BEST)
    except CheckpointError:
        return ["## Calibration", "", f"Not fitted: no readable {BEST} yet.", ""]
    predictions = state.get("val_predictions")
    record = (state.get("data") or {}).get("calibration")
    if not predictions:
        return section_lines(None, None, None, run_dir, BEST)
    if record is None:
        return ["## Calibration", "", "Not fitted yet: the temperature is fitted when training ends.", ""]
    return section_lines(record, predictions["position_prob"].numpy(), predictions["position_true"].numpy(),
                         run_dir, f"validation, epoch {state.get('epoch')} (best.pt)")


CV_CALIBRATION_FILE = "cv_calibration.png"


def cv_calibration(out: Path, oof_file: str | None, positions: list[str]) -> tuple[dict[str, Any] | None, str]:
    """T fitted on a cv's pooled out-of-fold predictions (every seed's rows) and cv.md's Calibration section
    (drawing out/cv_calibration.png). The record is None when the runs kept no predictions. Each fold's run
    keeps its own T (fitted on its own validation fold); this one says how calibrated the recipe is."""
    import csv

    if oof_file is None:
        return None, "\n" + "\n".join(section_lines(None, None, None, out, "this cv")) + "\n"
    with (out / oof_file).open(newline="") as f:
        rows = list(csv.DictReader(f))
    index = {str(p): i for i, p in enumerate(positions)}
    prob = np.array([[float(r[f"prob_{p}"]) for p in positions] for r in rows], dtype=np.float64).reshape(-1, len(positions))
    labels = np.array([index[r["position_true"]] for r in rows], dtype=np.int64)
    record = calibrate(prob, labels)
    lines = section_lines(record, prob, labels, out, "the pooled out-of-fold predictions", CV_CALIBRATION_FILE)
    lines += ["Each fold's run keeps the temperature fitted on its own validation fold (its best.pt); the one "
              "above, fitted on every held-out prediction, is what to expect of the recipe.", ""]
    return record, "\n" + "\n".join(lines)
