"""Models: ResNet-Plus trunks with a position head and a grade head, built by name.

    model = create_model("resnet_plus18", num_positions=3, grade_scale=[0, 3, 5, 7, 9])
    out = model(images)  # {"position": (B, P) logits, "grade": (B,) in scale units}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from torch import nn

from cornpipe.errors import ModelConfigError
from cornpipe.models.heads import GRADE_HEADS
from cornpipe.models.resnet_plus import BasicBlock, Bottleneck, ResNetPlus

# name -> constructor(num_positions=, grade_scale=, grade_head=, drop_path=, anti_alias=)
MODELS: dict[str, Callable[..., ResNetPlus]] = {
    "resnet_plus_tiny": partial(ResNetPlus, BasicBlock, (1, 1, 1, 1), widths=(16, 32, 64, 128), stem_width=8),
    "resnet_plus18": partial(ResNetPlus, BasicBlock, (2, 2, 2, 2)),
    "resnet_plus34": partial(ResNetPlus, BasicBlock, (3, 4, 6, 3)),
    "resnet_plus50": partial(ResNetPlus, Bottleneck, (3, 4, 6, 3)),
}


def create_model(
    name: str,
    num_positions: int,
    grade_scale: Sequence[float],
    grade_head: str = "regression",
    drop_path: float = 0.0,
    anti_alias: bool = False,
) -> nn.Module:
    """Build a registered model; raises ModelConfigError (a ValueError) for an unknown name or bad option."""
    if name not in MODELS:
        raise ModelConfigError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if grade_head not in GRADE_HEADS:
        raise ModelConfigError(f"unknown grade head {grade_head!r}; choose one of: {', '.join(GRADE_HEADS)}")
    return MODELS[name](
        num_positions=num_positions, grade_scale=list(grade_scale), grade_head=grade_head,
        drop_path=drop_path, anti_alias=anti_alias,
    )


__all__ = ["GRADE_HEADS", "MODELS", "ModelConfigError", "ResNetPlus", "create_model"]
