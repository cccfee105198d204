"""Run plots: loss/metric curves over epochs and the confusion matrices (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# (metric keys, axis title) for each curve panel; train and validation drawn in each
CURVE_PANELS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("loss",), "total loss"),
    (("position_accuracy", "position_macro_f1"), "position accuracy and macro-F1"),
    (("grade_mae",), "grade MAE (scale units)"),
)
PLAIN_NAMES = {"loss": "loss", "position_accuracy": "position accuracy", "position_macro_f1": "position macro-F1",
               "grade_mae": "grade MAE"}
COLOURS = {"loss": "tab:purple", "position_accuracy": "tab:blue", "position_macro_f1": "tab:green",
           "grade_mae": "tab:red"}
SPLIT_STYLES = {"train": ("train", "--"), "val": ("validation", "-")}  # split -> (plain name, line style)


def _series(records: Sequence[dict[str, Any]], split: str, key: str) -> np.ndarray:
    vals = [(r.get(split) or {}).get(key) for r in records]
    return np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)


def _ci_series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    lo, hi = [], []
    for r in records:
        ci = ((r.get("val") or {}).get("ci") or {}).get(key)
        lo.append(np.nan if not ci else float(ci[0]))
        hi.append(np.nan if not ci else float(ci[1]))
    if all(np.isnan(lo)):
        return None
    return np.array(lo), np.array(hi)


def curves_figure(records: Sequence[dict[str, Any]], best_epoch: int | None = None) -> Figure:
    """Loss, position accuracy/macro-F1 and grade MAE against epoch: colour = metric, dashed = train,
    solid = validation, shaded = validation's 95 % bootstrap interval where recorded."""
    epochs = np.array([r["epoch"] for r in records])
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(5.5 * len(CURVE_PANELS), 5.2), constrained_layout=True)
    for ax, (keys, title) in zip(axes, CURVE_PANELS, strict=True):
        for key in keys:
            for split, (split_name, style) in SPLIT_STYLES.items():
                y = _series(records, split, key)
                if np.all(np.isnan(y)):
                    continue
                ax.plot(epochs, y, linestyle=style, marker="o" if split == "val" else None, ms=3,
                        color=COLOURS[key], label=f"{split_name} {PLAIN_NAMES[key]}")
                band = _ci_series(records, key) if split == "val" else None
                if band is not None:
                    ax.fill_between(epochs, band[0], band[1], color=COLOURS[key], alpha=0.15, linewidth=0,
                                    label=f"validation {PLAIN_NAMES[key]}: 95 % bootstrap interval")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch} (best.pt)")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        # below the panel, never over the curves; long handles keep dashed and solid tellable apart
        ax.legend(fontsize=7, handlelength=3.5, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    return fig


def plot_curves(records: Sequence[dict[str, Any]], path: Path, best_epoch: int | None = None) -> Path:
    """curves_figure saved as a PNG at `path`."""
    fig = curves_figure(records, best_epoch)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(confusion: Sequence[Sequence[int]], names: Sequence[str], path: Path, title: str,
                   what: str = "position") -> Path:
    """confusion_figure saved to `path`."""
    fig = confusion_figure(confusion, names, title, what)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_figure(confusion: Sequence[Sequence[int]], names: Sequence[str], title: str,
                     what: str = "position") -> Figure:
    """Counts and row-normalised (recall per true class) side by side; rows = true `what`."""
    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = max(4.0, 1.2 * len(names) + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size), constrained_layout=True)
    for ax, data, sub, fmt in ((axes[0], cm, "counts", "{:g}"), (axes[1], norm, "row-normalised", "{:.2f}")):
        image = ax.imshow(data, cmap="Blues", vmin=0, vmax=max(data.max(), 1e-9) if sub == "counts" else 1.0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel(f"predicted {what}")
        ax.set_ylabel(f"true {what}")
        ax.set_title(f"{sub} (rows = true, columns = predicted)", fontsize=9)
        threshold = data.max() / 2 if data.max() > 0 else 0.5
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center",
                        color="white" if data[i, j] > threshold else "black", fontsize=9)
    fig.suptitle(title)
    return fig
