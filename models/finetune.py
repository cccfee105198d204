"""Fine-tuning a pretrained trunk: freeze it for the first epochs, keep its BatchNorm statistics.

On a survey of a few dozen images a fresh head's first, large gradients would wreck pretrained
features; training the heads alone first (`--freeze-epochs`), then everything at a smaller trunk
lr (`--trunk-lr-scale`), keeps them. BatchNorm statistics estimated on 8-64 images per batch are
noisy, so `--freeze-bn` keeps the trunk's ImageNet statistics (eval-mode BatchNorm) the whole run.
"""

from __future__ import annotations

from torch import nn

from cornpipe.models import trunk_and_head_parameters

_NORMS = (nn.modules.batchnorm._BatchNorm,)


def set_trunk_frozen(model: nn.Module, frozen: bool) -> None:
    """Stop (or restart) gradients into the trunk; the optimiser skips parameters without a gradient."""
    trunk, _ = trunk_and_head_parameters(model)
    for p in trunk:
        p.requires_grad_(not frozen)


def trunk_norms_eval(model: nn.Module) -> int:
    """Put the trunk's BatchNorm layers in eval mode (fixed running statistics); call after
    `model.train()`. Returns how many layers were switched."""
    model = getattr(model, "_orig_mod", model)
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, _NORMS) and not name.startswith("heads."):
            module.eval()
            count += 1
    return count
