"""Which samples a cross-validation fold trains and validates on: a pure function of the shard set's
manifest samples and the config's `folds`, `fold_group` and `fold_seed`.

- stratified K-fold: samples are grouped into position x grade cells, each cell shuffled (fold_seed) and
  dealt round-robin over the folds, the deal continuing from cell to cell; so every fold holds each cell's
  share to within one sample and fold sizes differ by at most one.
- leave-one-group-out (`fold_group` stage | source): fold i validates on the i-th group (sorted) and trains
  on the others; no group is ever on both sides.

Its own module so the trainer, evaluation and `cornpipe cv` (cornpipe.runs.cv) all read it without
importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cornpipe.errors import ConfigError
from cornpipe.runs.config import TrainConfig
from cornpipe.runs.groups import group_values


def stratified_folds(cells: Sequence[Any], k: int, seed: int) -> np.ndarray:
    """Fold index int64[N] for each sample, stratified on `cells` (e.g. (position, grade) pairs)."""
    n = len(cells)
    if k < 2 or k > n:
        raise ConfigError(f"folds must be between 2 and the number of samples ({n}), got {k}")
    cells = [tuple(c) if isinstance(c, (tuple, list)) else (c,) for c in cells]
    index = {c: i for i, c in enumerate(sorted(set(cells)))}
    keys = np.array([index[c] for c in cells], dtype=np.int64)
    rng = np.random.default_rng([int(seed), 0xF01D])
    fold = np.empty(n, dtype=np.int64)
    dealt = 0
    for key in range(len(index)):
        members = rng.permutation(np.flatnonzero(keys == key))
        fold[members] = (dealt + np.arange(len(members))) % k
        dealt += len(members)
    return fold


def group_folds(groups: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    """(fold index int64[N], the group each fold holds out): one fold per distinct group, sorted."""
    names = sorted(set(groups), key=lambda g: (str(type(g)), g))
    if len(names) < 2:
        raise ConfigError(f"leave-one-group-out needs at least 2 groups, found {len(names)}")
    index = {g: i for i, g in enumerate(names)}
    return np.array([index[g] for g in groups], dtype=np.int64), names


def fold_assignment(samples: Sequence[dict], cfg: TrainConfig) -> tuple[np.ndarray, list[str]]:
    """(fold of each manifest sample, a name per fold) for the config's folds/fold_group/fold_seed."""
    if cfg.fold_group != "none":
        fold, names = group_folds(group_values(samples, cfg.fold_group))
        return fold, [f"{cfg.fold_group} {g}" for g in names]
    fold = stratified_folds([(s["position"], float(s["grade"])) for s in samples], cfg.folds, cfg.fold_seed)
    return fold, [f"fold {i + 1}/{cfg.folds}" for i in range(cfg.folds)]


def uses_folds(cfg: TrainConfig) -> bool:
    return cfg.folds > 0 or cfg.fold_group != "none"


def fold_ids(samples: Sequence[dict], cfg: TrainConfig) -> tuple[list[int], list[int], str] | None:
    """(train sample ids, val sample ids, fold name) of the config's fold; None: the convert-time split."""
    if not uses_folds(cfg):
        return None
    fold, names = fold_assignment(samples, cfg)
    if not 0 <= cfg.fold < len(names):
        raise ConfigError(f"fold {cfg.fold} does not exist: there are {len(names)} folds (0..{len(names) - 1})")
    ids = np.array([int(s["id"]) for s in samples], dtype=np.int64)
    return ids[fold != cfg.fold].tolist(), ids[fold == cfg.fold].tolist(), names[cfg.fold]


def number_of_folds(samples: Sequence[dict], cfg: TrainConfig) -> int:
    return len(fold_assignment(samples, cfg)[1])
