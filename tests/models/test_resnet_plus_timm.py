"""ResNet-Plus is timm's ResNet configured as the hand-written ResNet-Plus it replaced (issue 14).

On the same weights the two gave bit-identical pooled features; these tests hold the configuration
to that architecture (parameter counts, stem, shortcuts, SE, zero gamma, BlurPool placement), so a
change of timm's defaults cannot silently change the model.
"""

from __future__ import annotations

import pytest
import torch
from timm.layers import SEModule
from timm.models.resnet import Bottleneck
from torch import nn

from cornpipe.models import MODELS, create_model
from cornpipe.models.catalogue import count_parameters
from cornpipe.models.resnet_plus import blur_pool

SCALE = [0, 3, 5, 7, 9]

# with both heads (3 positions, regression grade head): what the hand-written ResNet-Plus had
HAND_WRITTEN_PARAMETERS = {
    "resnet_plus_tiny": 313_708,
    "resnet_plus18": 11_287_908,
    "resnet_plus34": 21_468_700,
    "resnet_plus50": 26_066_452,
}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_name_has_the_hand_written_parameter_count() -> None:
    assert set(MODELS) == set(HAND_WRITTEN_PARAMETERS)
    assert {name: count_parameters(name) for name in MODELS} == HAND_WRITTEN_PARAMETERS


@pytest.mark.parametrize("name", ["resnet_plus_tiny", "resnet_plus50"])
def test_resnet_d_stem_shortcuts_se_and_zero_gamma(name: str) -> None:
    trunk = create_model(name, num_positions=3, grade_scale=SCALE).trunk
    stem = [m for m in trunk.conv1 if isinstance(m, nn.Conv2d)]
    width = stem[0].out_channels
    assert [(c.kernel_size, c.stride, c.out_channels) for c in stem] == [
        ((3, 3), (2, 2), width), ((3, 3), (1, 1), width), ((3, 3), (1, 1), 2 * width)]
    assert isinstance(trunk.maxpool, nn.MaxPool2d) and trunk.maxpool.stride == 2
    blocks = [b for stage in (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4) for b in stage]
    for block in blocks:
        assert isinstance(block.se, SEModule)
        assert block.se.fc1.out_channels == max(8, (block.se.fc1.in_channels // 16 + 4) // 8 * 8)
        last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
        assert torch.all(last_bn.weight == 0)  # each block starts as relu(shortcut(x))
        if block.downsample is not None and block.stride == 2:  # ResNet-D: average pool, then 1x1 conv
            pool, conv = block.downsample[0], block.downsample[1]
            assert isinstance(pool, nn.AvgPool2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)


def test_anti_alias_blurs_instead_of_striding() -> None:
    trunk = create_model("resnet_plus50", num_positions=3, grade_scale=SCALE, anti_alias=True).trunk
    blur = blur_pool()
    assert isinstance(trunk.maxpool[0], nn.MaxPool2d) and trunk.maxpool[0].stride == 1
    assert isinstance(trunk.maxpool[1], blur)
    strided_3x3 = [m for name, m in trunk.named_modules() if isinstance(m, nn.Conv2d)
                   and m.kernel_size == (3, 3) and m.stride == (2, 2) and not name.startswith("conv1.")]
    assert strided_3x3 == []  # only the first stem conv keeps its stride
    assert sum(isinstance(m, blur) for m in trunk.modules()) == 4  # stem + the first block of stages 2-4


def test_anti_aliased_model_takes_images_down_to_one_pixel_maps() -> None:
    """BlurPool pads by replication: a 16 px image reaches stage 4 as 1x1 maps (reflection would fail)."""
    model = create_model("resnet_plus_tiny", num_positions=3, grade_scale=SCALE, anti_alias=True).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16))
    assert out["position"].shape == (2, 3) and torch.isfinite(out["position"]).all()


def test_resnet_plus_keeps_the_default_normalisation() -> None:
    """No pretrained weights: input_stats is None, so train/predict normalise as they always did."""
    from cornpipe.models import input_stats

    assert input_stats(create_model("resnet_plus_tiny", num_positions=3, grade_scale=SCALE)) is None
