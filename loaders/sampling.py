"""Which rows a rank reads in an epoch: oversampling of rare classes and sharding across ranks.

Every backend asks `epoch_indices(...)` for its rows (FFCV traversal order, DALI external source,
torch sampler, resident index tensor), so they all see the same draw. The draw is a pure function
of its arguments: the global epoch comes from `np.random.default_rng([seed, epoch])` and is the
same on every rank; rank r then takes the strided slice `global[r::world_size]`.

Strategies (`OVERSAMPLE_STRATEGIES`), per-sample weight w_i, normalised to sum 1, over the sample's
cell: its position, or with `cells` (the other `--oversample-by` keys as int codes, loaders.cells) the
tuple (position, cells_i), e.g. position x origin:

- `none`     no weights: each row exactly once per epoch (a permutation when shuffled, row order
             otherwise). It ignores `cells`: a draw of every image once has nothing to balance.
- `balanced` w_i = 1 / n(cell_i): every cell gets the same share of the epoch (position x origin:
             field photos of each position as often as lab photos of it).
- `sqrt`     w_i = 1 / sqrt(n(cell_i)): halfway (on a log scale) between none and balanced.
- `joint`    the cell and the grade: position x grade (x cells), w_i = 1 / (n(cell_i) + alpha) with
             alpha = the mean size of the non-empty cells. Cells are balanced towards equal shares, but
             smoothed: a cell of one image gets about 1/(1 + alpha) of a full share instead of a full share
             (which would repeat that one image hundreds of times an epoch), and no sample's weight is more
             than (n_max + alpha) / (1 + alpha) times another's. Empty cells draw nothing. Without `cells`
             it is exactly the position x grade draw it always was.

A sample with no value for a key is in that key's "unknown" cell (loaders.cells), not dropped.

Weighted epochs draw with replacement and have the unweighted length (the number of rows) unless
`num_samples` (the global epoch length, all ranks together) says otherwise; their order is the
draw's order (`shuffle` only matters for `none`).

Sharding: the union of all ranks' slices is the global epoch, with no padding duplicates (unlike
torch's DistributedSampler); per-rank lengths differ by at most one. DDP needs every rank to run
the same number of steps: pass `even=True` to truncate the global epoch to a multiple of world_size
(at most world_size - 1 draws dropped, different ones each shuffled epoch), and use drop_last in the
loader if the per-rank length is not a multiple of the batch size.
"""

from __future__ import annotations

import numpy as np

from cornpipe.errors import LoaderError
from cornpipe.loaders.base import OVERSAMPLE_STRATEGIES


def check_strategy(strategy: str) -> str:
    """Return `strategy` if it is known, else raise a LoaderError listing the valid names."""
    if strategy not in OVERSAMPLE_STRATEGIES:
        raise LoaderError(
            f"unknown oversample strategy {strategy!r}; valid: {', '.join(OVERSAMPLE_STRATEGIES)}"
        )
    return strategy


def _group_counts(keys: np.ndarray) -> np.ndarray:
    """For each element, how many elements share its key."""
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True, axis=0)
    return counts[inverse.reshape(-1)].astype(np.float64)


def sample_weights(position: np.ndarray | None, grade: np.ndarray | None, strategy: str,
                   cells: np.ndarray | None = None) -> np.ndarray | None:
    """Per-sample draw probabilities float64[N] (sum 1) for `strategy`, or None for `none`.

    `cells`: int codes (N,) or (N, K) of the other keys the draw balances (origin, camera, ...), None:
    position alone (joint: position x grade)."""
    check_strategy(strategy)
    if strategy == "none":
        return None
    if position is None:
        raise LoaderError(f"oversample {strategy!r} needs position labels")
    position = np.asarray(position).reshape(-1)
    if position.size == 0:
        raise LoaderError(f"oversample {strategy!r} needs at least one sample")
    keys = position if cells is None else _cells(position, cells)
    if strategy == "balanced":
        weights = 1.0 / _group_counts(keys)
    elif strategy == "sqrt":
        weights = 1.0 / np.sqrt(_group_counts(keys))
    else:  # joint
        if grade is None:
            raise LoaderError("oversample 'joint' needs grade labels")
        grade = np.asarray(grade, dtype=np.float64).reshape(-1)
        if grade.shape != position.shape:
            raise LoaderError(f"position ({position.size}) and grade ({grade.size}) label counts differ")
        cells = np.stack([position.astype(np.float64), grade], axis=1) if cells is None else \
            np.concatenate([keys.astype(np.float64), grade[:, None]], axis=1)
        counts = _group_counts(cells)
        alpha = position.size / len(np.unique(cells, axis=0))  # mean non-empty cell size
        weights = 1.0 / (counts + alpha)
    return weights / weights.sum()


def _cells(position: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """(N, 1 + K) int64: position beside the other keys' codes."""
    codes = np.asarray(cells, dtype=np.int64)
    codes = codes.reshape(len(codes), -1)
    if len(codes) != position.size:
        raise LoaderError(f"{len(codes)} oversampling cells for {position.size} samples")
    return np.concatenate([position.astype(np.int64)[:, None], codes], axis=1)


def global_epoch(
    n: int,
    *,
    position: np.ndarray | None = None,
    grade: np.ndarray | None = None,
    strategy: str = "none",
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    num_samples: int | None = None,
    cells: np.ndarray | None = None,
) -> np.ndarray:
    """Row indices int64[L] of the whole epoch (all ranks together), before sharding."""
    check_strategy(strategy)
    if n < 0:
        raise LoaderError(f"number of samples must be >= 0, got {n}")
    length = n if num_samples is None else int(num_samples)
    if length < 0:
        raise LoaderError(f"num_samples must be >= 0, got {num_samples}")
    if n == 0 or length == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(epoch)])
    weights = sample_weights(position, grade, strategy, cells)
    if weights is not None:
        if weights.size != n:
            raise LoaderError(f"{weights.size} labels for {n} samples")
        return rng.choice(n, size=length, replace=True, p=weights).astype(np.int64)
    if not shuffle:
        return np.arange(length, dtype=np.int64) % n
    # Without replacement: consecutive permutations when more than one pass is asked for.
    passes = -(-length // n)
    return np.concatenate([rng.permutation(n) for _ in range(passes)])[:length].astype(np.int64)


def epoch_indices(
    n: int,
    *,
    position: np.ndarray | None = None,
    grade: np.ndarray | None = None,
    strategy: str = "none",
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_samples: int | None = None,
    even: bool = False,
    cells: np.ndarray | None = None,
) -> np.ndarray:
    """Row indices int64[k] that `rank` reads in `epoch`; a pure function of its arguments.

    `num_samples` is the global epoch length (default n). `even=True` truncates the global epoch to
    a multiple of `world_size` so every rank gets the same k. `cells`: the other oversampling keys' codes
    (sample_weights).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise LoaderError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")
    rows = global_epoch(n, position=position, grade=grade, strategy=strategy, shuffle=shuffle,
                        seed=seed, epoch=epoch, num_samples=num_samples, cells=cells)
    if even:
        rows = rows[: len(rows) - len(rows) % world_size]
    return rows[rank::world_size]


def rank_length(total: int, rank: int, world_size: int, even: bool = False) -> int:
    """Length of `rank`'s slice of a global epoch of `total` draws (without drawing it)."""
    if even:
        total -= total % world_size
    return len(range(rank, total, world_size))


def num_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches in an epoch of `num_samples` samples."""
    if batch_size < 1:
        raise LoaderError(f"batch_size must be >= 1, got {batch_size}")
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)
