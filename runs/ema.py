"""An exponential moving average of the weights (state fits a weights_only checkpoint)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEma:
    """Exponential moving average of a model's parameters and buffers (timm ModelEmaV3 style).

    The decay is warmed up, min(decay, (1 + t) / (10 + t)) at update t, so that a short run on a
    small dataset (a handful of steps per epoch) still ends with weights near the trained ones.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_float, model_float = [], []
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if e.is_floating_point():
                ema_float.append(e)
                model_float.append(m.detach())
            else:  # e.g. BatchNorm's num_batches_tracked
                e.copy_(m)
        torch._foreach_lerp_(ema_float, model_float, 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
