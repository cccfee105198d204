"""CPU batches are written into reused arrays, and a batch its consumer still holds never changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cornpipe.loaders.base import IMAGENET
from cornpipe.loaders.pixels import finish_cpu
from cornpipe.loaders.pixels.finish import finish_batch
from cornpipe.loaders.pixels.memory import OutputPool


def test_an_array_is_reused_only_once_nothing_made_from_it_is_alive():
    pool = OutputPool((2, 3), keep=2, dtype=np.float32)
    first = pool.take()
    view = torch.from_numpy(first)[1:]  # a batch made from it, and a view of that
    del first
    second = pool.take()
    assert not np.shares_memory(second, view.numpy())  # still held through the view
    del view
    assert pool.take() is pool.arrays[0]  # free again: reused
    held = [pool.take() for _ in range(3)]  # more held than kept: fresh arrays, the pool stays at 2
    assert len(pool.arrays) == 2 and len({a.ctypes.data for a in held}) == 3


@pytest.mark.skipif(not finish_cpu.AVAILABLE, reason="needs numba")
def test_the_fused_finish_reuses_a_freed_batch_and_never_one_that_is_held():
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=gen)
    other = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=gen)
    factors = np.full((4, 3), 1.2, np.float32)
    for channels_last in (False, True):
        held = finish_batch(pixels, factors, channels_last=channels_last, norm=IMAGENET)
        kept = held.clone()
        second = finish_batch(other, factors, channels_last=channels_last, norm=IMAGENET)
        assert torch.equal(held, kept) and held.data_ptr() != second.data_ptr()  # the held batch is untouched
        ptr = second.data_ptr()
        del second
        third = finish_batch(other, None, channels_last=channels_last, norm=IMAGENET)
        assert third.data_ptr() == ptr  # the freed batch's array, reused
        assert torch.allclose(third, finish_batch(other, None, fast=False, channels_last=channels_last, norm=IMAGENET), atol=1e-4)
