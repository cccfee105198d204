"""The resident CPU path's crop threads: the same batches as augment_batch, and no thread settings leaked."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from cornpipe.loaders.backends.crop_threads import CropThreads
from cornpipe.loaders.base import HOST_DTYPE, IMAGENET, AugmentConfig
from cornpipe.loaders.pixels.augment import augment_batch
from cornpipe.loaders.pixels.params import sample_params


def _store(n: int = 9) -> tuple[torch.Tensor, np.ndarray]:
    """A resident-style store: (N, 3, 60, 70) uint8, NHWC in memory, images of mixed sizes top-left."""
    gen = torch.Generator().manual_seed(0)
    store = torch.randint(0, 256, (n, 3, 60, 70), dtype=torch.uint8, generator=gen)
    sizes = np.array([[60, 70], [48, 64], [59, 41]] * (n // 3))
    return store.contiguous(memory_format=torch.channels_last), sizes


@pytest.fixture(scope="module")
def threads():
    pool = CropThreads(3)
    yield pool
    pool.close()


@pytest.mark.parametrize("config, dtype, channels_last", [
    (AugmentConfig(), torch.float32, False),  # flips and jitter in the fused finish
    (AugmentConfig(), torch.float32, True),
    (AugmentConfig(), torch.float16, False),
    (AugmentConfig(rot90=True), torch.float32, False),  # quarter turns: uint8 flips first
    (AugmentConfig(), HOST_DTYPE, False),  # host-only: crops and flips, uint8 NHWC
], ids=["float32", "channels_last", "float16", "rot90", "host-only"])
def test_crop_threads_give_augment_batchs_batch(threads, config, dtype, channels_last):
    store, sizes = _store()
    index = np.array([4, 0, 8, 8, 2, 7, 1, 3, 5, 6, 0, 2, 4, 1, 3, 7, 8, 5, 6, 2, 0])  # 21: chunks of 8, 8, 5
    params = sample_params(np.random.default_rng(3), sizes[index], config)
    want = augment_batch(store, params, 24, dtype=dtype, channels_last=channels_last, index=index,
                         kernel="interpolate", norm=IMAGENET)
    got = threads.augment(store, params, 24, index, dtype=dtype, channels_last=channels_last, norm=IMAGENET)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last or dtype == HOST_DTYPE
    assert torch.equal(got, want)


def test_a_held_batch_is_never_overwritten_by_the_next(threads):
    store, sizes = _store()
    index = np.arange(9)
    first = threads.augment(store, sample_params(np.random.default_rng(0), sizes, AugmentConfig()), 24, index, norm=IMAGENET)
    kept = first.clone()
    for seed in (1, 2, 3):
        threads.augment(store, sample_params(np.random.default_rng(seed), sizes, AugmentConfig()), 24, index, norm=IMAGENET)
    assert torch.equal(first, kept)


def test_the_threads_run_torch_single_threaded_and_leave_the_process_setting_alone():
    default = torch.get_num_threads()
    pool = CropThreads(2)
    try:
        counts = list(pool._pool.map(lambda _: torch.get_num_threads(), range(6)))
        assert counts == [1] * 6
        assert torch.get_num_threads() == default
        started_later = []
        thread = threading.Thread(target=lambda: started_later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert started_later == [default]
    finally:
        pool.close()


@pytest.mark.parametrize("dtype", [torch.float32, HOST_DTYPE], ids=["float32", "host-only"])
def test_batches_are_made_under_inference_mode_too(threads, dtype):
    # evaluation and predict run the loader inside torch.inference_mode(); the pool threads do not
    store, sizes = _store()
    index = np.arange(9)
    params = sample_params(np.random.default_rng(5), sizes, AugmentConfig())
    want = augment_batch(store, params, 24, dtype=dtype, index=index, kernel="interpolate", norm=IMAGENET)
    with torch.inference_mode():
        got = threads.augment(store, params, 24, index, dtype=dtype, norm=IMAGENET)
    assert torch.equal(got, want)
