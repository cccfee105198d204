"""Models: a trunk with a position head and a grade head, built by name.

    model = create_model("resnet_plus18", num_positions=3, grade_scale=[0, 3, 5, 7, 9])
    model = create_model("timm:tf_efficientnet_lite0", num_positions=3, grade_scale=[0, 3, 5, 7, 9])
    out = model(images)  # {"position": (B, P) logits, "grade": (B,) in scale units}

Built-in names (MODELS) are cornpipe's ResNet-Plus; `timm:NAME` is any timm trunk (models.timm_net).
Both have `forward_features` -> (B, C) and `heads` (an nn.ModuleDict); `trunk_and_head_parameters`
splits them for fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from torch import nn

from cornpipe.errors import ModelConfigError
from cornpipe.models.heads import GRADE_HEADS
from cornpipe.models.resnet_plus import ResNetPlus

TIMM_PREFIX = "timm:"  # --model timm:NAME: any timm trunk under the two heads

# name -> constructor(num_positions=, grade_scale=, grade_head=, drop_path=, anti_alias=);
# each a configuration of timm's ResNet (models.resnet_plus.ARCHS)
MODELS: dict[str, Callable[..., ResNetPlus]] = {
    "resnet_plus_tiny": partial(ResNetPlus, "resnet_plus_tiny"),  # BasicBlock (1, 1, 1, 1), widths 16-128
    "resnet_plus18": partial(ResNetPlus, "resnet_plus18"),
    "resnet_plus34": partial(ResNetPlus, "resnet_plus34"),
    "resnet_plus50": partial(ResNetPlus, "resnet_plus50"),
}


def check_model_name(name: str) -> None:
    """ModelConfigError unless `name` is a built-in model or `timm:` + a name timm knows."""
    if name.startswith(TIMM_PREFIX):
        from cornpipe.models.timm_net import _timm

        if not _timm().is_model(name[len(TIMM_PREFIX):]):
            raise ModelConfigError(f"timm has no model {name[len(TIMM_PREFIX):]!r}; list them with "
                                   f"`cornpipe models --filter PATTERN`")
    elif name not in MODELS:
        raise ModelConfigError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, "
                               f"or timm:NAME for a timm trunk (`cornpipe models`)")


def create_model(
    name: str,
    num_positions: int,
    grade_scale: Sequence[float],
    grade_head: str = "regression",
    drop_path: float = 0.0,
    anti_alias: bool = False,
    pretrained: bool = False,
) -> nn.Module:
    """Build a registered model or a timm trunk (`timm:NAME`) under the two heads; ModelConfigError (a
    ValueError) for an unknown name or a bad option. `pretrained`: timm's hub weights (timm names only)."""
    check_model_name(name)
    if grade_head not in GRADE_HEADS:
        raise ModelConfigError(f"unknown grade head {grade_head!r}; choose one of: {', '.join(GRADE_HEADS)}")
    if name.startswith(TIMM_PREFIX):
        from cornpipe.models.timm_net import TimmNet

        return TimmNet(name[len(TIMM_PREFIX):], num_positions=num_positions, grade_scale=list(grade_scale),
                       grade_head=grade_head, drop_path=drop_path, pretrained=pretrained)
    if pretrained:
        raise ModelConfigError(f"{name} has no pretrained weights (a cornpipe model); use --init-weights FILE "
                               f"or a timm:NAME model")
    return MODELS[name](
        num_positions=num_positions, grade_scale=list(grade_scale), grade_head=grade_head,
        drop_path=drop_path, anti_alias=anti_alias,
    )


def trunk_and_head_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(trunk parameters, head parameters): the heads are `model.heads`, the trunk everything else."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: the module it wraps
    head_ids = {id(p) for p in model.heads.parameters()}
    trunk = [p for p in model.parameters() if id(p) not in head_ids]
    return trunk, list(model.heads.parameters())


def input_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) on the 0-1 scale a pretrained trunk expects, or None for cornpipe's own trunks."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "input_stats", None)


__all__ = ["GRADE_HEADS", "MODELS", "TIMM_PREFIX", "ModelConfigError", "ResNetPlus", "check_model_name",
           "create_model", "input_stats", "trunk_and_head_parameters"]
