"""Task heads on the pooled trunk features: position logits and the grade.

Heads run in float32 with autocast off: they are a few hundred multiply-adds per image, and the
grade (a sigmoid mapped onto the scale, or CORN's cumulative product) loses too much in float16.

Grade heads (`GRADE_HEADS`):
- "regression": one value, sigmoid(z) * (max - min) + min, so the prediction always lies on the
  scale's range;
- "corn": CORN ordinal head (Shi, Cao & Raschka 2021): K-1 conditional logits
  P(y > level_k | y > level_{k-1}); `grade` is the decoded level (the number of cumulative
  probabilities above 0.5, CORN's rule, which picks the median of the predicted distribution and
  so suits MAE), `grade_logits` (B, K-1) feed the CORN loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cornpipe.choices import GRADE_HEADS  # noqa: F401  (re-exported)
from cornpipe.errors import ModelConfigError
from cornpipe.models.metrics import validate_grade_scale


class PositionHead(nn.Module):
    """Linear classifier: features (B, C) -> logits (B, P)."""

    def __init__(self, in_features: int, num_positions: int) -> None:
        super().__init__()
        if num_positions < 2:
            raise ModelConfigError(f"need at least 2 position classes, got {num_positions}")
        self.fc = nn.Linear(in_features, num_positions)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(device_type=features.device.type, enabled=False):
            return {"position": self.fc(features.float())}


class RegressionGradeHead(nn.Module):
    """One value mapped onto [min, max] of the grade scale: features (B, C) -> grade (B,)."""

    def __init__(self, in_features: int, grade_scale: Sequence[float]) -> None:
        super().__init__()
        levels = validate_grade_scale(grade_scale)
        self.fc = nn.Linear(in_features, 1)
        self.low = float(levels[0])
        self.span = float(levels[-1] - levels[0])

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(device_type=features.device.type, enabled=False):
            z = self.fc(features.float()).squeeze(1)  # (B,)
            return {"grade": torch.sigmoid(z) * self.span + self.low}


def corn_label_probs(logits: torch.Tensor) -> torch.Tensor:
    """CORN conditional logits (B, K-1) -> unconditional P(y > level_k) (B, K-1), non-increasing in k."""
    return torch.cumprod(torch.sigmoid(logits.float()), dim=1)


def corn_level_probs(logits: torch.Tensor) -> torch.Tensor:
    """CORN conditional logits (B, K-1) -> probability of each of the K levels (B, K), rows sum to 1."""
    above = corn_label_probs(logits)  # (B, K-1)
    ones = torch.ones_like(above[:, :1])
    zeros = torch.zeros_like(above[:, :1])
    return torch.cat([ones, above], dim=1) - torch.cat([above, zeros], dim=1)


class CornGradeHead(nn.Module):
    """CORN ordinal head over the K scale levels: features (B, C) -> grade (B,), grade_logits (B, K-1)."""

    def __init__(self, in_features: int, grade_scale: Sequence[float]) -> None:
        super().__init__()
        levels = validate_grade_scale(grade_scale)
        self.fc = nn.Linear(in_features, levels.size - 1)
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32), persistent=False)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(device_type=features.device.type, enabled=False):
            logits = self.fc(features.float())  # (B, K-1)
            rank = (corn_label_probs(logits) > 0.5).sum(dim=1)  # (B,) level index, 0..K-1
            return {"grade": self.levels[rank], "grade_logits": logits}


def make_grade_head(kind: str, in_features: int, grade_scale: Sequence[float]) -> nn.Module:
    if kind == "regression":
        return RegressionGradeHead(in_features, grade_scale)
    if kind == "corn":
        return CornGradeHead(in_features, grade_scale)
    raise ModelConfigError(f"unknown grade head {kind!r}; choose one of: {', '.join(GRADE_HEADS)}")


def corn_loss(logits: torch.Tensor, level_index: torch.Tensor) -> torch.Tensor:
    """CORN loss: mean binary cross-entropy of task k over the samples with level >= k.

    logits (B, K-1) conditional logits; level_index (B,) int64 in [0, K). Vectorised form of the
    reference implementation (coral-pytorch `corn_loss`): task k sees the samples whose level is
    at least k and learns whether their level exceeds k.
    """
    k = torch.arange(logits.shape[1], device=logits.device)  # (K-1,)
    y = level_index[:, None]
    mask = (y >= k).float()  # (B, K-1): sample takes part in task k
    target = (y > k).float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return (bce * mask).sum() / mask.sum()  # every sample takes part in task 0, so mask.sum() >= B
