"""ResNet-Plus: a ResNet with the well-tested improvements, trunk plus two task heads.

- ResNet-D (He et al. 2019, "Bag of Tricks"): a deep stem of three 3x3 convs instead of one 7x7,
  and shortcuts that downsample with a 2x2 average pool before the 1x1 conv (no information
  thrown away by a strided 1x1);
- squeeze-and-excitation (Hu et al. 2018) at the end of every residual branch;
- the last BatchNorm gamma of every residual branch starts at zero (Goyal et al. 2017), so each
  block starts as the identity and deep nets train stably from scratch;
- optional anti-aliased downsampling (Zhang 2019): strided convs become stride-1 conv + BlurPool;
- optional stochastic depth (Huang et al. 2016): residual branches dropped per sample, the rate
  growing linearly from 0 at the first block to `drop_path` at the last.

Layout follows timm: `forward_features(x)` -> pooled features (B, C); `heads` is an
`nn.ModuleDict({"position", "grade"})`; `forward(x)` merges the heads' output dicts.
No Python control flow depends on tensor values, so `torch.compile(fullgraph=True)` works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cornpipe.errors import ModelConfigError
from cornpipe.models.heads import PositionHead, make_grade_head


def _make_divisible(v: float, divisor: int = 8) -> int:
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class BlurPool2d(nn.Module):
    """Fixed [1, 2, 1] x [1, 2, 1] / 16 low-pass filter, then subsample by `stride` (depthwise)."""

    def __init__(self, channels: int, stride: int = 2) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :]) / 16.0
        self.register_buffer("kernel", kernel.expand(channels, 1, 3, 3).clone(), persistent=False)
        self.stride = stride
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # replicate padding keeps a constant image constant and works on 1-pixel maps
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(x, self.kernel.to(x.dtype), stride=self.stride, groups=self.channels)


class SqueezeExcite(nn.Module):
    """Channel gating: global average -> bottleneck MLP -> sigmoid scale per channel."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = _make_divisible(channels / reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of samples, rescale the rest."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3f}"


def _bn(channels: int, zero_gamma: bool = False) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    nn.init.constant_(bn.weight, 0.0 if zero_gamma else 1.0)
    nn.init.zeros_(bn.bias)
    return bn


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """ResNet-D shortcut: average-pool then 1x1 conv when the shape changes, identity otherwise."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    layers: list[nn.Module] = []
    if stride > 1:
        layers.append(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False))
    layers += [nn.Conv2d(in_ch, out_ch, 1, bias=False), _bn(out_ch)]
    return nn.Sequential(*layers)


def _strided_conv3x3(in_ch: int, out_ch: int, stride: int, anti_alias: bool) -> list[nn.Module]:
    """3x3 conv + BN + ReLU; with anti-aliasing a stride-2 conv becomes conv (stride 1) + BlurPool."""
    blur = anti_alias and stride > 1
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, 3, stride=1 if blur else stride, padding=1, bias=False),
        _bn(out_ch),
        nn.ReLU(inplace=True),
    ]
    if blur:
        layers.append(BlurPool2d(out_ch, stride))
    return layers


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34) + SE; last BN gamma zero."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, drop_path: float, anti_alias: bool) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.branch = nn.Sequential(
            *_strided_conv3x3(in_ch, width, stride, anti_alias),
            nn.Conv2d(width, out_ch, 3, padding=1, bias=False),
            _bn(out_ch, zero_gamma=True),
            SqueezeExcite(out_ch),
        )
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.drop_path(self.branch(x)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (ResNet-50) + SE; last BN gamma zero."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, drop_path: float, anti_alias: bool) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.branch = nn.Sequential(
            nn.Conv2d(in_ch, width, 1, bias=False),
            _bn(width),
            nn.ReLU(inplace=True),
            *_strided_conv3x3(width, width, stride, anti_alias),
            nn.Conv2d(width, out_ch, 1, bias=False),
            _bn(out_ch, zero_gamma=True),
            SqueezeExcite(out_ch),
        )
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.drop_path(self.branch(x)))


class ResNetPlus(nn.Module):
    """ResNet-D + SE + zero-gamma trunk with a position head and a grade head."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        *,
        num_positions: int,
        grade_scale: Sequence[float],
        grade_head: str = "regression",
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 32,
        drop_path: float = 0.0,
        anti_alias: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ModelConfigError(f"drop_path must be in [0, 1), got {drop_path}")
        stem_out = 2 * stem_width
        # deep stem: 3x3/2 -> 3x3 -> 3x3, then 3x3 max pool /2 (max pool stride 1 + blur when anti-aliased)
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, stride=2, padding=1, bias=False), _bn(stem_width), nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width, 3, padding=1, bias=False), _bn(stem_width), nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_out, 3, padding=1, bias=False), _bn(stem_out), nn.ReLU(inplace=True),
            *([nn.MaxPool2d(3, 1, 1), BlurPool2d(stem_out, 2)] if anti_alias else [nn.MaxPool2d(3, 2, 1)]),
        )
        total = sum(layers)
        rates = [drop_path * i / max(total - 1, 1) for i in range(total)]
        stages: list[nn.Module] = []
        in_ch, b = stem_out, 0
        for s, (n_blocks, width) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for i in range(n_blocks):
                stride = 2 if (s > 0 and i == 0) else 1
                blocks.append(block(in_ch, width, stride, rates[b], anti_alias))
                in_ch, b = width * block.expansion, b + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = in_ch
        self.grade_head_kind = grade_head
        self.heads = nn.ModuleDict({
            "position": PositionHead(in_ch, num_positions),
            "grade": make_grade_head(grade_head, in_ch, grade_scale),
        })
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> pooled features (B, num_features)."""
        x = self.stages(self.stem(x))  # (B, C, H/32, W/32)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.forward_features(x)
        out: dict[str, torch.Tensor] = {}
        for head in self.heads.values():
            out.update(head(features))
        return out
