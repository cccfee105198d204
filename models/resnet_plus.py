"""ResNet-Plus: timm's ResNet configured with the well-tested improvements, trunk plus two task heads.

Each improvement is one option of `timm.models.resnet.ResNet` (RESNET_PLUS below):
- ResNet-D (He et al. 2019, "Bag of Tricks"): a deep stem of three 3x3 convs (`stem_type="deep"`,
  widths stem_width, stem_width, 2 * stem_width) instead of one 7x7, and shortcuts that downsample
  with a 2x2 average pool before the 1x1 conv (`avg_down=True`);
- squeeze-and-excitation (Hu et al. 2018) at the end of every residual branch
  (`block_args={"attn_layer": "se"}`: reduction 16, hidden width rounded to a multiple of 8, biases on);
- the last BatchNorm gamma of every residual branch starts at zero (Goyal et al. 2017,
  `zero_init_last=True`), so each block starts as the identity;
- optional anti-aliased downsampling (Zhang 2019, `anti_alias=True`): strided 3x3 convs become
  stride-1 conv + BlurPool, the stem's max pool runs at stride 1 then blurs (`aa_layer`);
- optional stochastic depth (Huang et al. 2016, `drop_path`): the rate grows linearly from 0 at the
  first block to `drop_path` at the last.

Until issue 14 this file was a hand-written ResNet; on the same weights timm's configuration gives
bit-identical pooled features (same 3x3-stride placement, SE rounding and bias, BlurPool taps), so
the hand-written blocks were deleted. Parameter names are timm's (`trunk.conv1.0.weight`,
`trunk.layer1.0.se.fc1.weight`, ...): checkpoints saved by the hand-written version (`stem.0.weight`,
`stages.0.0.branch.0.weight`, ...) no longer load by name.

The wrapper is `TimmNet` (models.timm_net): `forward_features(x)` -> pooled (B, C), `heads` an
`nn.ModuleDict({"position", "grade"})`, `forward(x)` merging the heads' dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from torch import nn

from cornpipe.errors import ModelConfigError
from cornpipe.models.timm_net import TimmNet

# what every ResNet-Plus adds to timm's ResNet (the deep stem and avg_down are resnet*d's defaults too;
# stated here so the architecture reads in one place)
RESNET_PLUS: dict[str, Any] = {
    "stem_type": "deep",
    "stem_width": 32,  # stem convs 32, 32, 64
    "avg_down": True,
    "block_args": {"attn_layer": "se"},
    "zero_init_last": True,
}

# name -> (timm model it starts from: the block type and depth, overrides)
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet_plus_tiny": ("resnet18d", {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128), "stem_width": 8}),
    "resnet_plus18": ("resnet18d", {}),  # BasicBlock (2, 2, 2, 2)
    "resnet_plus34": ("resnet34d", {}),  # BasicBlock (3, 4, 6, 3)
    "resnet_plus50": ("resnet50d", {}),  # Bottleneck (3, 4, 6, 3), stride on the 3x3
}


@cache
def blur_pool() -> type[nn.Module]:
    """timm's BlurPool2d ([1, 2, 1] x [1, 2, 1] / 16, depthwise, stride 2) padding by replication.

    timm pads by reflection, which fails on a 1-pixel map (stage 4 of a 16 px image) and differs at
    the border from what ResNet-Plus always did. A class, not a partial: timm's stem tests
    `issubclass(aa_layer, nn.AvgPool2d)`. Built on first use so that importing cornpipe.models does
    not import timm.
    """
    from timm.layers import BlurPool2d

    class ReplicateBlurPool2d(BlurPool2d):
        def __init__(self, channels: int | None = None, filt_size: int = 3, stride: int = 2, **kwargs: Any) -> None:
            super().__init__(channels, filt_size, stride, pad_mode="replicate", **kwargs)

    return ReplicateBlurPool2d


class ResNetPlus(TimmNet):
    """A ResNet-Plus trunk (timm's ResNet, configured as RESNET_PLUS + ARCHS[name]) with the two heads."""

    def __init__(self, name: str, *, num_positions: int, grade_scale: Sequence[float],
                 grade_head: str = "regression", drop_path: float = 0.0, anti_alias: bool = False) -> None:
        if name not in ARCHS:
            raise ModelConfigError(f"unknown ResNet-Plus {name!r}; choose one of: {', '.join(ARCHS)}")
        base, overrides = ARCHS[name]
        kwargs = {**RESNET_PLUS, **overrides}
        if anti_alias:
            kwargs["aa_layer"] = blur_pool()
        super().__init__(base, num_positions=num_positions, grade_scale=grade_scale, grade_head=grade_head,
                         drop_path=drop_path, timm_kwargs=kwargs)

    @property
    def input_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """None: no pretrained weights, so the loaders' default normalisation (as for any cornpipe trunk)."""
        return None
