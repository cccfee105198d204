"""Grad-CAM maps of the position head (the `grad-cam` package) for cornpipe's trunk-plus-heads models.

grad-cam's ClassifierOutputTarget reads one logits tensor; cornpipe's models return a dict, so PositionLogits
hands grad-cam the position logits. The target layer is the trunk's last stage (timm's feature_info: layer4 of
ResNet-Plus and timm's ResNets, the last block stage of an EfficientNet), unless its map would be smaller than
MIN_CAM_CELLS a side at this image size: then the latest stage that is not (a 1x1 map has nowhere to point).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cornpipe.errors import CornpipeError

MIN_CAM_CELLS = 4  # cells a side of the activation map the CAM is read from
EXTRA_MISSING = "class-activation maps need the `explain` extra: pip install 'cornpipe[explain]' (grad-cam)"


class PositionLogits(nn.Module):
    """model(x)["position"]: the (B, P) tensor grad-cam's targets index."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["position"].float()


def target_layer(model: nn.Module, image_size: int) -> tuple[str, nn.Module]:
    """(name, module) of the trunk stage the CAM is read from (see the module docstring)."""
    trunk = getattr(model, "trunk", model)
    stages = [f for f in getattr(trunk, "feature_info", None) or [] if isinstance(f, dict) and f.get("module")]
    if stages:
        usable = [f for f in stages if image_size // int(f.get("reduction", 1)) >= MIN_CAM_CELLS] or stages[:1]
        name = usable[-1]["module"]
        return f"trunk.{name}", trunk.get_submodule(name)
    convs = [(n, m) for n, m in trunk.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise CornpipeError(f"no convolution in {type(trunk).__name__}: no class-activation map to draw")
    return f"trunk.{convs[-1][0]}", convs[-1][1]


def class_maps(model: nn.Module, images: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
    """Grad-CAM of position class classes[i] for images[i]: (B, H, W) float32 in [0, 1], at the input's size."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as exc:
        raise CornpipeError(EXTRA_MISSING) from exc
    name, layer = target_layer(model, int(images.shape[-1]))
    wrapper = PositionLogits(model).eval()
    try:
        with torch.enable_grad(), GradCAM(model=wrapper, target_layers=[layer]) as cam:
            # the graph grad-cam needs runs from the input; weights that do not ask for gradients skip theirs
            maps = cam(input_tensor=images.float().requires_grad_(True), targets=[ClassifierOutputTarget(int(c)) for c in classes])
    except (ValueError, RuntimeError) as exc:  # a token trunk (ViT): its stage is no (B, C, H, W) map
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CornpipeError(f"no class-activation map from {name} ({why}): Grad-CAM needs a trunk whose last "
                            "stage is a convolutional feature map") from exc
    # grad-cam scales each map to [0, 1]; a flat map (all-zero gradients) stays 0, never NaN
    return np.clip(np.nan_to_num(np.asarray(maps, dtype=np.float32)), 0.0, 1.0)


@torch.inference_mode()
def position_probs(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Softmax over positions (B, P), as predict computes it without TTA."""
    return model(images.float())["position"].float().softmax(dim=1).cpu().numpy()
