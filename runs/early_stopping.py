"""The monitored validation number and early stopping on it (state fits a weights_only checkpoint)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def monitor_value(metrics: dict[str, Any], name: str, grade_scale: list[float],
                  ignore: Sequence[str] = ()) -> float:
    """The monitored validation number, always "higher is better".

    `combined` = position macro-F1 - grade MAE / max(grade_scale): both terms are on a 0..1 scale,
    so a run cannot buy position F1 with a large grade error or the other way round. A task in `ignore`
    (constant in the train split, runs.tasks) leaves it: position macro-F1 alone, or the negated grade MAE.
    """
    if name == "combined" and "grade" in ignore:
        value = metrics["position_macro_f1"]
    elif name == "combined" and "position" in ignore:
        value = -metrics["grade_mae"]
    elif name == "combined":
        value = metrics["position_macro_f1"] - metrics["grade_mae"] / max(grade_scale)
    elif name in ("grade_mae", "loss"):
        value = -metrics[name]
    else:
        value = metrics[name]
    # undefined this epoch (e.g. QWK when every grade falls on one level): the worst possible value
    return float(value) if value is not None and math.isfinite(value) else -math.inf


class EarlyStopping:
    """Stop after `patience` epochs without a monitor gain larger than `min_delta`."""

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best = -math.inf
        self.best_epoch = 0  # 1-based; 0 = none yet
        self.bad_epochs = 0

    def step(self, value: float, epoch: int) -> bool:
        """Record this epoch's monitor; True when it is the new best."""
        if self.best_epoch == 0 or value > self.best + self.min_delta:  # epoch 1 is always a best
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
