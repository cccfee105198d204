"""Batch arrays reused once nothing holds them: no fresh pages for every batch.

A fresh array per batch costs its first-touch page faults every batch: a float32 batch of 64 images
at 224 px is larger than glibc's largest mmap threshold (32 MiB), so each one is mapped, faulted in
and unmapped anew, which costs the fused CPU finish about twice its own work (docs/loaders.md).
Batches are written into an `OutputPool`'s arrays instead, and an array is reused
only once no tensor made from it (a batch its consumer still holds, or a view of one) is alive.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict

import numpy as np


class OutputPool:
    """(batch_size, ...) arrays of one shape and dtype to write batches into. An array is reused once
    nothing else references it, i.e. no tensor made from it (a batch the consumer still holds, or any
    view of one) is alive; at most `keep` arrays are remembered."""

    def __init__(self, shape: tuple[int, ...], keep: int, dtype: np.dtype | type) -> None:
        self.shape, self.keep, self.dtype = tuple(shape), keep, np.dtype(dtype)
        self.arrays: list[np.ndarray] = []
        self._lock = threading.Lock()  # two epochs of one loader may run at once (an abandoned one winding down)

    def take(self) -> np.ndarray:
        """A free array; the caller holds it (a reference) before another take() can see it as free."""
        with self._lock:
            for array in self.arrays:
                if sys.getrefcount(array) <= 3:  # the list, `array` and getrefcount's argument: free
                    return array
            array = np.empty(self.shape, dtype=self.dtype)
            if len(self.arrays) < self.keep:
                self.arrays.append(array)
            return array


class Pools:
    """An OutputPool per (shape, dtype), for the `shapes` most recently asked for."""

    def __init__(self, keep: int, shapes: int) -> None:
        self.keep, self.shapes = keep, shapes
        self._pools: OrderedDict[tuple, OutputPool] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        key = (tuple(shape), np.dtype(dtype).str)
        with self._lock:
            pool = self._pools.pop(key, None) or OutputPool(shape, self.keep, dtype)
            self._pools[key] = pool  # the most recent last
            while len(self._pools) > self.shapes:
                self._pools.popitem(last=False)
        return pool.take()
