"""The train/val split: stratified by position x grade, seeded, and never empty by accident."""

from __future__ import annotations

import numpy as np

from cornpipe.choices import SEED_MAX  # noqa: F401  (re-exported: the split's seeds obey it too)


def assign_split(position: np.ndarray, grade: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask (N,), True = validation.

    Each position x grade cell sends floor(n * f) samples to val; the remaining val places (so that the
    total is round(N * f), at least 1 and at most N - 1 when N >= 2) go to the cells with the largest
    remainders, ties broken by the seed. A cell of one sample can therefore land in either split.
    Which samples of a cell go to val is a seeded permutation, so the split is a pure function of
    (labels in input order, val_fraction, seed).
    """
    n = len(position)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(n, dtype=bool)
    if n == 0:
        return is_val
    target = int(round(n * val_fraction))
    if n >= 2:
        target = min(max(target, 1), n - 1)
    keys = list(zip(position.tolist(), grade.tolist(), strict=True))
    cells: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        cells.setdefault(k, []).append(i)
    order = sorted(cells)
    sizes = np.array([len(cells[k]) for k in order])
    quota = sizes * val_fraction
    take = np.floor(quota).astype(int)
    remaining = target - int(take.sum())
    if remaining > 0:
        priority = (quota - take) + rng.random(len(order)) * 1e-6  # seeded tie-break
        priority[take >= sizes] = -np.inf
        for c in np.argsort(-priority, kind="stable")[:remaining]:
            if take[c] < sizes[c]:
                take[c] += 1
    elif remaining < 0:  # only when target was clipped down to n - 1
        for c in np.argsort(-take, kind="stable")[: -remaining]:
            take[c] -= 1
    for c, k in enumerate(order):
        members = np.array(cells[k])
        chosen = rng.permutation(members)[: take[c]]
        is_val[chosen] = True
    return is_val
