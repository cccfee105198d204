"""Host-only batches (LoaderSpec dtype torch.uint8, `bench loaders --host-only`): every backend hands out
the (B, S, S, 3) uint8 crops a GPU would be fed -- the geometry applied, the colour jitter and the
normalisation left to the GPU -- and they are the pixels its float batches are normalised from."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_library

from cornpipe.errors import LoaderError
from cornpipe.loaders import make_loader
from cornpipe.loaders.base import HOST_DTYPE, IMAGENET, MEAN_255, STD_255, AugmentConfig
from cornpipe.loaders.common import make_spec
from cornpipe.loaders.pixels.finish import Finisher

S = 32
GEOMETRY = AugmentConfig(rot90=True, brightness=0.0, contrast=0.0, saturation=0.0)  # crop, both flips, rot90
EVERYTHING = AugmentConfig(rot90=True)  # and colour jitter, which host-only batches leave out

BACKENDS = [
    pytest.param("torch", {}, id="torch"),
    pytest.param("resident", {}, id="resident"),
    pytest.param("resident", {"crop_kernel": "roi_align"}, id="resident-roi_align"),  # its CUDA path, on CPU
    pytest.param("ffcv", {}, id="ffcv"),
    pytest.param("dali", {}, id="dali"),
]


def one_epoch(root, backend: str, options: dict, split: str, dtype: torch.dtype | None,
              augment: AugmentConfig | bool | None) -> list:
    needs_library(backend)
    loader = make_loader(root, split, backend=backend, batch_size=8, image_size=S, device="cpu", workers=1,
                         seed=3, dtype=dtype, augment=augment, options=options, normalization=IMAGENET, oversample="none")
    try:
        loader.set_epoch(2)
        return [tuple(t.clone() for t in batch) for batch in loader]
    finally:
        loader.close()


def unnormalise(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) normalised float -> (B, S, S, 3) on the 0..255 scale."""
    mean, std = torch.tensor(MEAN_255).view(1, 3, 1, 1), torch.tensor(STD_255).view(1, 3, 1, 1)
    return (images.float() * std + mean).permute(0, 2, 3, 1)


@pytest.mark.parametrize(("backend", "options"), BACKENDS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_host_only_batches_are_the_float_batches_before_normalising(tiny_shards, backend, options, split):
    host = one_epoch(tiny_shards, backend, options, split, HOST_DTYPE, GEOMETRY if split == "train" else None)
    full = one_epoch(tiny_shards, backend, options, split, torch.float32, GEOMETRY if split == "train" else None)
    assert len(host) == len(full) > 1
    for (images, *labels), (reference, *ref_labels) in zip(host, full, strict=True):
        b = len(labels[0])
        assert images.shape == (b, S, S, 3) and images.dtype == torch.uint8
        assert images.is_contiguous() and images.device.type == "cpu"
        for got, want in zip(labels, ref_labels, strict=True):
            assert torch.equal(got, want)
        # the same crops: the float batch is these pixels normalised (roi_align's float pixels are rounded)
        assert (images.float() - unnormalise(reference)).abs().max() <= 1.0


@pytest.mark.parametrize(("backend", "options"), BACKENDS)
def test_host_only_batches_leave_the_colour_jitter_to_the_gpu(tiny_shards, backend, options):
    """Jitter on or off, the same geometry draws give the same uint8 crops: no jitter was applied."""
    jittered = one_epoch(tiny_shards, backend, options, "train", HOST_DTYPE, EVERYTHING)
    plain = one_epoch(tiny_shards, backend, options, "train", HOST_DTYPE, GEOMETRY)
    for a, b in zip(jittered, plain, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])


def test_a_library_buffer_is_copied_out_of(tmp_path):
    """FFCV reuses its batch buffers: a host-only batch must not change when the library writes the next one."""
    buffer = torch.randint(0, 256, (4, S, S, 3), dtype=torch.uint8)
    finish = Finisher(torch.device("cpu"), HOST_DTYPE, jitter=True, channels_last=False, norm=IMAGENET)
    out = finish(buffer, torch.ones(4, 3))
    assert torch.equal(out, buffer) and out.data_ptr() != buffer.data_ptr()
    owned = Finisher(torch.device("cpu"), HOST_DTYPE, jitter=True, channels_last=False, owned=True, norm=IMAGENET)
    assert owned(buffer, torch.ones(4, 3)).data_ptr() == buffer.data_ptr()


def test_host_only_is_uint8_on_the_cpu_and_nothing_else():
    assert make_spec("train", dtype=torch.uint8, normalization=IMAGENET).host_only
    assert not make_spec("train", normalization=IMAGENET).host_only
    with pytest.raises(LoaderError, match=r"floating point type or torch.uint8 \(host-only\), got torch.int64"):
        make_spec("train", dtype=torch.int64, normalization=IMAGENET)
    if torch.cuda.is_available():
        with pytest.raises(LoaderError, match="stays on the CPU"):
            make_spec("train", dtype=torch.uint8, device="cuda", normalization=IMAGENET)
