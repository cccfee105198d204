"""Any timm trunk under cornpipe's two heads: `--model timm:NAME`.

    model = create_model("timm:tf_efficientnet_lite0", num_positions=3, grade_scale=[0, 3, 5, 7, 9])

The trunk is `timm.create_model(NAME, num_classes=0)`: timm's own pooling, so `trunk(x)` is the
pooled (B, C) feature vector the heads read. The layout is ResNetPlus's (`forward_features`, an
`nn.ModuleDict` of heads, `forward` merging their dicts), so every part of the trainer (AMP,
channels_last, compile, EMA, checkpoints, resume, predict) treats both the same.

`pretrained=True` asks timm for its hub weights (network or local cache). Offline that fails, and the
error names `--init-weights FILE` (cornpipe.models.init_weights) as the way to load weights from disk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cornpipe.errors import ModelConfigError
from cornpipe.models.heads import PositionHead, make_grade_head

# ImageNet statistics (0-1 scale): what a trunk expects when its pretrained_cfg does not say
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _timm():  # noqa: ANN202 - the timm module
    try:
        import timm
    except ImportError as exc:  # a dependency of cornpipe; missing only in a broken install
        raise ModelConfigError("timm models need timm: pip install timm") from exc
    return timm


def timm_names(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """timm's model names matching a glob `pattern` (only those with pretrained weights if asked)."""
    return list(_timm().list_models(pattern, pretrained=pretrained))


class TimmNet(nn.Module):
    """A timm trunk (pooled features) with a position head and a grade head."""

    def __init__(self, name: str, *, num_positions: int, grade_scale: Sequence[float],
                 grade_head: str = "regression", drop_path: float = 0.0, pretrained: bool = False,
                 timm_kwargs: Mapping[str, Any] | None = None) -> None:
        """`timm_kwargs`: passed on to `timm.create_model` (architecture options, e.g. ResNet-Plus's)."""
        super().__init__()
        timm = _timm()
        if not 0.0 <= drop_path < 1.0:
            raise ModelConfigError(f"drop_path must be in [0, 1), got {drop_path}")
        if not timm.is_model(name):
            raise ModelConfigError(f"timm has no model {name!r}; see `cornpipe models --filter '*{name[:6]}*'`")
        kwargs = {**(timm_kwargs or {}), **({"drop_path_rate": drop_path} if drop_path else {})}
        try:
            self.trunk = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        except (OSError, RuntimeError, ValueError) as exc:  # hub unreachable, no cached file, no weights
            if not pretrained:
                raise ModelConfigError(f"timm could not build {name!r}: {exc}") from exc
            reason = " ".join(str(exc).split())[:160]
            raise ModelConfigError(f"cannot fetch timm's pretrained weights for {name!r} ({reason}); offline, "
                                   f"load a weights file with --init-weights FILE instead") from exc
        self.timm_name = name
        self.num_features = int(self.trunk.num_features)
        self.grade_head_kind = grade_head
        self.heads = nn.ModuleDict({
            "position": PositionHead(self.num_features, num_positions),
            "grade": make_grade_head(grade_head, self.num_features, grade_scale),
        })

    @property
    def input_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) on the 0-1 scale that the trunk's pretrained weights expect."""
        cfg = getattr(self.trunk, "pretrained_cfg", None) or {}
        return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> pooled features (B, num_features)."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.forward_features(x)
        out: dict[str, torch.Tensor] = {}
        for head in self.heads.values():
            out.update(head(features))
        return out
