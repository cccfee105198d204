"""Bootstrap intervals resample in chunks (issue 22 item 2): peak memory stays flat as the number of
resamples grows (it was ~8 (R x N) arrays: >10 GB at N=200k, R=1000), and the intervals are the same
draws whatever the chunking."""

from __future__ import annotations

import tracemalloc

import numpy as np

from cornpipe.models.metrics import _bootstrap


def _inputs(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    pos_true, pos_pred = rng.integers(0, 3, n), rng.integers(0, 3, n)
    t_idx, p_idx = rng.integers(0, 5, n), rng.integers(0, 5, n)
    scale = np.array([0.0, 3.0, 5.0, 7.0, 9.0])
    return dict(pos_true=pos_true, pos_pred=pos_pred, g_true=scale[t_idx], g_pred=scale[p_idx], t_idx=t_idx,
                p_idx=p_idx, num_classes=3, num_levels=5, tolerance=2.0, seed=1)


def test_chunked_intervals_are_the_draws_of_one_chunk():
    data = _inputs(997)
    whole = _bootstrap(**data, resamples=300, chunk_elements=300 * 997)
    assert _bootstrap(**data, resamples=300, chunk_elements=7 * 997 + 3) == whole
    assert all(v is not None for v in whole.values())


def _peak(resamples: int, n: int) -> int:
    data = _inputs(n)
    tracemalloc.start()
    try:
        _bootstrap(**data, resamples=resamples)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_resamples():
    n = 20_000
    small, large = _peak(60, n), _peak(480, n)
    # 8x the resamples: the (R x N) version took ~8x the memory (480 x 20k int64 indices alone: 77 MB)
    assert large < 1.5 * small, (small, large)
    assert large < 480 * n * 8, large
