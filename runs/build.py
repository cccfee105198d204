"""One place builds a run: from a TrainConfig (train, bench train) or a checkpoint (predict, evaluation).

    run = build_run(cfg, positions, grade_scale, fold=run_fold(cfg, samples))   # a run to train
    run = run_from_checkpoint(state, "best.pt", device="cpu")                   # a trained model to use
    loader = make_loader(shards, "train", **run.train_request(train_count))

It decides, once: the device, the AMP dtype (AMP_DTYPES, the one mapping), channels_last for the model
AND the loaders, the trunk's normalisation (the model's own input statistics, or the checkpoint's saved
ones), the model (the only `create_model` call outside models/), the loss, the loaders' keyword sets and
the fold's sample ids. Everything below takes these as given: a loader never re-derives them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from cornpipe.loaders.backends.resident_budget import MemoryBudget
from cornpipe.loaders.base import IMAGENET, AugmentConfig, Normalization
from cornpipe.loaders.common import default_workers, usable_cores
from cornpipe.models import create_model, input_stats
from cornpipe.models.losses import MultiTaskLoss
from cornpipe.runs.checkpoint import BEST, inference_weights, load_weights
from cornpipe.runs.config import DEFAULT_LOSS_WEIGHTS, TrainConfig, resolve_runtime
from cornpipe.runs.folds import fold_ids

# a resolved `amp` mode -> the autocast dtype; None: no autocast (float32)
AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of a resolved amp mode (resolve_runtime has replaced "auto")."""
    return AMP_DTYPES[amp]


def loader_dtype(device: str | torch.device, amp: str) -> torch.dtype:
    """The dtype of a run's batches: the autocast dtype on CUDA (bf16 batches for a bf16 run, not float16
    re-cast at the first layer); float32 on the CPU, where the loaders finish in float32."""
    dtype = AMP_DTYPES[amp]
    return dtype if dtype is not None and torch.device(device).type == "cuda" else torch.float32


def runtime(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with device, amp, compile and channels_last resolved for this machine, and torch's CPU threads
    set (set_threads: cfg.threads stays as given, so a run resumed elsewhere counts that machine's cores)."""
    set_threads(cfg.threads, cfg.workers)
    return resolve_runtime(cfg, torch.cuda.is_available())


def auto_threads(workers: int | None) -> int:
    """torch's threads when the user does not say: the cores this process may use minus the loader's workers
    (`workers`, None = the loaders' default), keeping at least half of them for the model. Torch's own default
    (every core) oversubscribes a shared machine while the loader decodes: docs/performance.md has the figures."""
    cores = usable_cores()
    loader = default_workers() if workers is None else workers
    return max(1, cores - min(loader, cores // 2))


def set_threads(threads: int | None, workers: int | None = None) -> int:
    """Set torch's intra-op threads (and inter-op ones, when torch still allows it) to `threads`, None =
    auto_threads(workers); returns the number set."""
    n = auto_threads(workers) if threads is None else threads
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # torch allows it once, before any inter-op work: a second run in the process keeps it
        pass
    return n


class Fold(NamedTuple):
    """A cross-validation fold: manifest sample ids on each side, and the fold's name for the report."""

    train_ids: list[int]
    val_ids: list[int]
    name: str


def run_fold(cfg: TrainConfig, samples: Sequence[dict]) -> Fold | None:
    """The config's fold of the manifest `samples`; None: the convert-time train/val split."""
    fold = fold_ids(samples, cfg)
    return None if fold is None else Fold(*fold)


def trunk_normalization(model: nn.Module) -> Normalization:
    """What the trunk's weights expect: a pretrained trunk's own statistics, ImageNet's for cornpipe's trunks."""
    stats = input_stats(model)
    return IMAGENET if stats is None else Normalization.from_unit(*stats)


def saved_normalization(data: Mapping[str, Any]) -> Normalization:
    """A checkpoint's `data["normalization"]` (runs saved before it was kept normalised with ImageNet's)."""
    saved = data.get("normalization")
    return Normalization(tuple(saved["mean"]), tuple(saved["std"])) if saved else IMAGENET


@dataclass(frozen=True)
class Run:
    """What a run is made of, decided once (see the module docstring)."""

    cfg: TrainConfig  # resolved: device, amp, compile and channels_last are concrete
    model: nn.Module  # on cfg.device, channels_last when cfg.channels_last
    loss_fn: MultiTaskLoss
    normalization: Normalization  # the loaders' (and predict's) mean/std: the trunk's
    positions: tuple[str, ...]
    grade_scale: tuple[float, ...]
    fold: Fold | None = None  # a cross-validation fold; None: the convert-time split

    @property
    def device(self) -> torch.device:
        return torch.device(self.cfg.device)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return amp_dtype(self.cfg.amp)

    @functools.cached_property
    def memory_budget(self) -> MemoryBudget:
        """The one budget all of this run's resident stores share (measured when the first is built)."""
        return MemoryBudget(self.cfg.device)

    def loader_fields(self, *, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """The make_loader keywords every loader of this run shares (device, memory format, dtype, ...)."""
        cfg = self.cfg
        fields = dict(backend=cfg.loader, batch_size=cfg.batch_size, image_size=cfg.image_size,
                      device=cfg.device, seed=cfg.seed, workers=cfg.workers, channels_last=cfg.channels_last,
                      normalization=self.normalization, rank=rank, world_size=world_size,
                      dtype=loader_dtype(cfg.device, cfg.amp))
        if cfg.loader == "resident":
            fields["options"] = {"budget": self.memory_budget}
        return fields

    def train_request(self, train_count: int, *, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """make_loader keywords of the train split: drawn per epoch (oversampling, augmentation); `even`
        so every rank runs the same number of steps; `train_count`: images in the train split (or fold)."""
        jitter = self.cfg.jitter
        return dict(self.loader_fields(rank=rank, world_size=world_size), oversample=self.cfg.oversample,
                    oversample_by=self.cfg.oversample_by,
                    augment=AugmentConfig(brightness=jitter, contrast=jitter, saturation=jitter), even=True,
                    sample_ids=self.fold.train_ids if self.fold else None,
                    drop_last=train_count // world_size > self.cfg.batch_size)

    def val_request(self, *, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """make_loader keywords of the val split (or fold): fixed order, every image once."""
        return dict(self.loader_fields(rank=rank, world_size=world_size), oversample="none", shuffle=False,
                    sample_ids=self.fold.val_ids if self.fold else None)


def build_run(cfg: TrainConfig, positions: Sequence[str], grade_scale: Sequence[float], *,
              fold: Fold | None = None, pretrained: bool = False,
              weights: Mapping[str, torch.Tensor] | None = None, weights_from: str = "the checkpoint",
              normalization: Normalization | None = None) -> Run:
    """A run of `cfg` for a shard set's position classes and grade scale.

    `pretrained`: start from timm's pretrained weights; `weights`: a state dict to load (a checkpoint's, read
    from `weights_from`);
    `normalization`: None = the trunk's own (trunk_normalization)."""
    cfg = runtime(cfg)
    scale = [float(g) for g in grade_scale]
    model = create_model(cfg.model, num_positions=len(positions), grade_scale=scale, grade_head=cfg.grade_head,
                         drop_path=cfg.drop_path, pretrained=pretrained)
    if weights is not None:
        load_weights(model, weights, Path(weights_from), cfg.model)  # a misfit is one line, not torch's key list
    model = model.to(torch.device(cfg.device))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # None: not set by the user and not yet planned (runs.tasks): the default weights
    loss_fn = MultiTaskLoss(weights=cfg.loss_weights or DEFAULT_LOSS_WEIGHTS, label_smoothing=cfg.label_smoothing, grade_scale=scale,
                            grade_head=cfg.grade_head)
    return Run(cfg=cfg, model=model, loss_fn=loss_fn,
               normalization=trunk_normalization(model) if normalization is None else normalization,
               positions=tuple(str(p) for p in positions), grade_scale=tuple(scale), fold=fold)


def run_from_checkpoint(state: Mapping[str, Any], source: str, *, samples: Sequence[dict] | None = None,
                        **overrides: Any) -> Run:
    """The run a checkpoint holds, its inference weights loaded (the EMA's when kept), normalised as it
    was trained. `overrides`: TrainConfig fields to change first (device, amp, ...); `samples`: the shard
    set's manifest samples, to find the run's fold (None: no fold)."""
    cfg = runtime(dataclasses.replace(TrainConfig.from_dict(state["config"], source=source), **overrides))
    data = state["data"]
    return build_run(cfg, data["positions"], data["grade_scale"],
                     fold=None if samples is None else run_fold(cfg, samples),
                     weights=inference_weights(state), weights_from=source,
                     normalization=saved_normalization(data))



def model_checkpoint(model: Path) -> Path:
    """MODEL as evaluate, predict and load_model take it: a run folder (its best.pt) or a checkpoint file."""
    return model / BEST if model.is_dir() else model
