"""Peak memory and time of the bootstrap intervals (models.metrics._bootstrap) at a given size.

    python -m cornpipe.bench.bootstrap_memory --n 200000 --resamples 1000 [--chunk-elements E]

`--chunk-elements` N*R measures the unchunked (R x N) version. Peak from tracemalloc (numpy reports
its allocations to it). Figures: docs/performance.md.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from cornpipe.models.metrics import _CHUNK_ELEMENTS, _bootstrap


def measure(n: int, resamples: int, chunk_elements: int = _CHUNK_ELEMENTS) -> tuple[float, float]:
    """(peak MiB, seconds) of one bootstrap over n samples, 3 positions and 5 grade levels."""
    rng = np.random.default_rng(0)
    t_idx, p_idx = rng.integers(0, 5, n), rng.integers(0, 5, n)
    scale = np.array([0.0, 3.0, 5.0, 7.0, 9.0])
    tracemalloc.start()
    start = time.perf_counter()
    try:
        _bootstrap(rng.integers(0, 3, n), rng.integers(0, 3, n), scale[t_idx], scale[p_idx], t_idx, p_idx,
                   num_classes=3, num_levels=5, tolerance=2.0, resamples=resamples, seed=0,
                   chunk_elements=chunk_elements)
        return tracemalloc.get_traced_memory()[1] / 2**20, time.perf_counter() - start
    finally:
        tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--chunk-elements", type=int, default=_CHUNK_ELEMENTS)
    args = parser.parse_args()
    peak, seconds = measure(args.n, args.resamples, args.chunk_elements)
    print(f"n={args.n} resamples={args.resamples} chunk_elements={args.chunk_elements}: "
          f"peak {peak:,.0f} MiB, {seconds:.1f} s")


if __name__ == "__main__":
    main()
