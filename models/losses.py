"""The two-task loss: total = w_pos * CE(position) + w_grade * grade_loss.

Grade loss by head:
- "regression": Smooth L1 (Huber, beta = 0.1) between prediction and target both divided by the
  scale's maximum, so a loss value and the task weights mean the same on `0,3,5,7,9` and on `0-25`.
  In normalised units beta 0.1 is 0.9 grade on `0-9`: quadratic for small errors, L1 (robust to a
  mislabelled image) beyond. `grade_loss="mse"` gives plain MSE on the same normalised values.
- "corn": CORN loss on the target's level index on the scale (a mean binary cross-entropy, so it
  is on a different numeric scale from the regression loss; retune the weights when switching).

Targets are `(B,)`; any mismatch with the outputs raises ValueError instead of broadcasting
(a `(B, 1)` grade against `(B,)` would silently become a `(B, B)` loss otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cornpipe.errors import ModelConfigError
from cornpipe.grades import DEFAULT_GRADE_SCALE
from cornpipe.models.heads import GRADE_HEADS, corn_loss
from cornpipe.models.metrics import validate_grade_scale

GRADE_LOSSES: tuple[str, ...] = ("smooth_l1", "mse")
SMOOTH_L1_BETA = 0.1  # in units of the scale's maximum
ON_SCALE_ATOL = 1e-3  # a grade within this of a level counts as that level (float32 targets)


def checks_on_host(t: torch.Tensor) -> bool:
    """Whether a per-batch check of `t` may read its result on the host (free on the CPU, a device
    sync on CUDA; tests/runs/test_no_sync.py runs the CUDA branch on CPU tensors)."""
    return t.device.type == "cpu"


class MultiTaskLoss(nn.Module):
    """Weighted sum of the position cross-entropy and the grade loss; see the module docstring."""

    def __init__(
        self,
        weights: Sequence[float] = (0.7, 0.3),
        label_smoothing: float = 0.0,
        grade_scale: Sequence[float] = DEFAULT_GRADE_SCALE,
        grade_head: str = "regression",
        grade_loss: str = "smooth_l1",
    ) -> None:
        super().__init__()
        w = [float(x) for x in weights]
        if len(w) != 2 or min(w) < 0 or sum(w) <= 0:
            raise ModelConfigError(f"loss weights must be two non-negative numbers, not both 0, got {list(weights)}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ModelConfigError(f"label smoothing must be in [0, 1), got {label_smoothing}")
        if grade_head not in GRADE_HEADS:
            raise ModelConfigError(f"unknown grade head {grade_head!r}; choose one of: {', '.join(GRADE_HEADS)}")
        if grade_loss not in GRADE_LOSSES:
            raise ModelConfigError(f"unknown grade loss {grade_loss!r}; choose one of: {', '.join(GRADE_LOSSES)}")
        levels = validate_grade_scale(grade_scale)
        if levels[-1] <= 0:
            raise ModelConfigError(f"grade scale maximum must be > 0 to normalise by it, got {levels[-1]}")
        self.w_position, self.w_grade = w
        self.label_smoothing = float(label_smoothing)
        self.grade_head = grade_head
        self.grade_loss = grade_loss
        self.scale_max = float(levels[-1])
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32), persistent=False)

    def level_index(self, grade: torch.Tensor) -> torch.Tensor:
        """Grade values (B,) -> int64 level indices (B,); ValueError for a value not on the scale."""
        if self.levels.device != grade.device:  # moved once, not copied every batch
            self.levels = self.levels.to(grade.device)
        dist = (grade.float()[:, None] - self.levels[None, :]).abs()  # (B, K)
        nearest, index = dist.min(dim=1)
        off_scale = (nearest > ON_SCALE_ATOL).any()  # CORN targets must be exact levels
        if not checks_on_host(grade):  # an assert on the device: reading the flag would sync every step
            torch._assert_async(~off_scale, "grade values are not on the grade scale")
        elif bool(off_scale):
            bad = grade[nearest > ON_SCALE_ATOL][:5].tolist()
            raise ValueError(f"grade values {bad} are not on the grade scale {self.levels.tolist()}")
        return index

    def _check(self, outputs: Mapping[str, torch.Tensor], position: torch.Tensor, grade: torch.Tensor) -> None:
        logits, pred = outputs["position"], outputs["grade"]
        if logits.ndim != 2:
            raise ValueError(f"position logits must be (B, P), got {tuple(logits.shape)}")
        b = logits.shape[0]
        if tuple(position.shape) != (b,):
            raise ValueError(f"position target shape {tuple(position.shape)} does not match outputs ({b},)")
        if position.dtype != torch.int64:
            raise ValueError(f"position target must be int64 class indices, got {position.dtype}")
        if tuple(pred.shape) != (b,):
            raise ValueError(f"grade output shape {tuple(pred.shape)} must be ({b},)")
        if tuple(grade.shape) != (b,):
            raise ValueError(f"grade target shape {tuple(grade.shape)} does not match outputs ({b},)")
        if not grade.is_floating_point():
            raise ValueError(f"grade target must be a float tensor, got {grade.dtype}")
        if self.grade_head == "corn":
            k = self.levels.numel() - 1
            glog = outputs.get("grade_logits")
            if glog is None or tuple(glog.shape) != (b, k):
                shape = None if glog is None else tuple(glog.shape)
                raise ValueError(f"corn loss needs outputs['grade_logits'] of shape ({b}, {k}), got {shape}")

    def forward(
        self, outputs: Mapping[str, torch.Tensor], position: torch.Tensor, grade: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """outputs: the model's dict; position (B,) int64; grade (B,) float in scale units."""
        self._check(outputs, position, grade)
        # float32 losses whatever the autocast dtype of the outputs
        pos_loss = F.cross_entropy(outputs["position"].float(), position, label_smoothing=self.label_smoothing)
        if self.grade_head == "corn":
            grade_loss = corn_loss(outputs["grade_logits"], self.level_index(grade))
        else:
            pred = outputs["grade"].float() / self.scale_max
            target = grade.float() / self.scale_max
            if self.grade_loss == "mse":
                grade_loss = F.mse_loss(pred, target)
            else:
                grade_loss = F.smooth_l1_loss(pred, target, beta=SMOOTH_L1_BETA)
        total = self.w_position * pos_loss + self.w_grade * grade_loss
        return total, {"position": pos_loss.detach(), "grade": grade_loss.detach()}
