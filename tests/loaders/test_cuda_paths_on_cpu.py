"""The code the loaders run only on CUDA, run on CPU tensors (issue 11: the first GPU run must succeed
in one shot, and the test machine has no GPU).

Each CUDA-only branch of `loaders/` is reachable on the CPU (a kernel option, a constructor flag, an
injected decoder) and must compute what the CPU path computes. Images here are textured (noise on a
gradient): flat colours would hide a crop that reads the wrong row.
"""

from __future__ import annotations

import csv
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FORMATS
from PIL import Image

from cornpipe.loaders import make_loader
from cornpipe.loaders.backends import resident_loader as rl
from cornpipe.loaders.base import IMAGENET, MEAN_255, STD_255, AugmentConfig
from cornpipe.loaders.common import augment_params, make_spec
from cornpipe.loaders.pixels import finish_cpu
from cornpipe.loaders.pixels.augment import augment_batch
from cornpipe.loaders.pixels.finish import Finisher, color_jitter_batch, finish_batch, normalize_batch
from cornpipe.shards.shard_set import ShardSet

N_IMAGES = 32
SIZES = ((40, 56), (56, 40), (48, 48), (36, 60))  # (h, w): mixed shapes, so batches gather padded regions
IMAGE_SIZE = 48  # px: about the crops' own size, so one misread row shows (smaller outputs average it away)
# small crops, so outputs upsample and the first samples blend in the row above the box; no jitter: grey levels
GEOMETRY_ONLY = AugmentConfig(scale=(0.1, 0.5), rot90=True, brightness=0.0, contrast=0.0, saturation=0.0)


def textured(i: int, h: int, w: int) -> np.ndarray:
    """A gradient plus per-image noise: neighbouring rows and columns differ by tens of grey levels."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 200 / w, yy * 200 / h, (xx + yy) * 100 / (h + w)], -1)
    return np.clip(base + rng.uniform(0, 55, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def textured_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cornpipe.shards.convert import convert_dataset

    src = tmp_path_factory.mktemp("textured") / "src"
    src.mkdir()
    rows = []
    for i in range(N_IMAGES):
        h, w = SIZES[i % len(SIZES)]
        Image.fromarray(textured(i, h, w)).save(src / f"{i:04d}.png")
        rows.append((f"{i:04d}.png", i % 3, (0, 3, 5, 7, 9)[i % 5]))  # the default grade scale
    csv_path = src / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([("path", "position", "grade"), *rows])
    out = tmp_path_factory.mktemp("textured_shards") / "shards"
    convert_dataset(None, out, manifest_csv=csv_path, write_mode="jpg", workers=1, seed=0, formats=FORMATS)
    assert len(ShardSet(out).manifest["samples"]) == N_IMAGES  # none rejected
    return out


def grey_levels(images: torch.Tensor) -> torch.Tensor:
    """Normalised (B, 3, S, S) -> the 0..255 scale, so differences read as grey levels."""
    std = torch.tensor(STD_255).view(1, 3, 1, 1)
    mean = torch.tensor(MEAN_255).view(1, 3, 1, 1)
    return images.float().cpu() * std + mean


# ---------------------------------------------------------------------------------------------
# 1. resident: the gather + roi_align crop (the CUDA path) equals the crop from the image alone


@pytest.mark.parametrize("split", ["train", "val"])
def test_resident_gathered_crop_equals_the_crop_from_the_image_alone(textured_shards: Path, split: str) -> None:
    """A batch gathers only the region its boxes touch; each crop must still be the crop of its whole
    image (roi_align's bilinear taps read the row above and the column left of a box), whatever
    other images share the batch."""
    loader = make_loader(textured_shards, split, backend="resident", batch_size=4, image_size=IMAGE_SIZE,
                         workers=1, augment=GEOMETRY_ONLY if split == "train" else False, seed=3,
                         options={"crop_kernel": "roi_align"}, normalization=IMAGENET, oversample="none")
    try:
        worst, total, seen = 0.0, 0.0, 0
        for b, (rows, batch) in enumerate(zip(loader.batch_rows(), loader, strict=True)):
            assert batch.sample_id.tolist() == loader.sample_id[rows].tolist()
            params = augment_params(loader.spec, loader.sizes[rows], loader.epoch, b)
            got = grey_levels(batch.images)
            for i, row in enumerate(rows.tolist()):
                alone = augment_batch(loader.store[row:row + 1], params.row(i), IMAGE_SIZE, kernel="roi_align", norm=IMAGENET)
                diff = (got[i] - grey_levels(alone)[0]).abs()
                worst, total = max(worst, diff.max().item()), total + diff.mean().item()
                seen += 1
        assert seen == loader.num_samples
        assert worst < 0.01, (f"a gathered crop differs from its image's own crop by up to {worst:.2f} "
                              f"grey levels (mean {total / seen:.2f})")
    finally:
        loader.close()


# ---------------------------------------------------------------------------------------------
# 2. the other CUDA-only branches, on CPU tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("jitter", [True, False])
def test_finisher_tensor_path_equals_the_cpu_path(dtype: torch.dtype, channels_last: bool, jitter: bool) -> None:
    """ffcv/dali finish on CUDA with batched tensor ops; the same code on CPU tensors must give the
    CPU path's values, in the requested dtype and memory format."""
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (5, 20, 24, 3), dtype=torch.uint8, generator=gen)  # (B, S, S, 3) HWC
    pixels[3] = 250  # bright and flat: brightness clamps, the contrast centre moves
    factors = np.array([[1.2, 0.8, 1.2], [0.8, 1.2, 0.8], [1, 1, 1], [1.2, 1.2, 0.8], [1, 0.9, 1.1]], np.float32)
    cpu = Finisher(torch.device("cpu"), dtype, jitter=jitter, channels_last=channels_last, norm=IMAGENET)
    tensor_ops = Finisher(torch.device("cpu"), dtype, jitter=jitter, channels_last=channels_last, tensor_ops=True, norm=IMAGENET)
    assert not cpu.tensor_ops and tensor_ops.tensor_ops
    want, got = cpu(pixels, factors), tensor_ops(pixels, factors)
    for x in (want, got):
        assert x.shape == (5, 3, 20, 24) and x.dtype == dtype
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    tol = 1e-3 if dtype == torch.float32 else 1e-2  # float16 holds ~3 decimal digits of values up to ~2.6
    assert torch.allclose(got.float(), want.float(), atol=tol), (got.float() - want.float()).abs().max()


def test_whole_batch_passes_equal_cpu_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA jitter and normalise run over the whole batch in one pass, on the CPU a few images at
    a time; per-image statistics (the contrast centre) must not depend on which."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (9, 3, 12, 12), generator=gen).float()
    factors = np.random.default_rng(0).uniform(0.7, 1.3, (9, 3)).astype(np.float32)
    want = normalize_batch(color_jitter_batch(x.clone(), factors), norm=IMAGENET)
    monkeypatch.setattr("cornpipe.loaders.pixels.finish._CPU_CHUNK", 1000)  # one chunk: the CUDA pass
    got = normalize_batch(color_jitter_batch(x.clone(), factors), norm=IMAGENET)
    assert torch.allclose(got, want, atol=1e-5)


def test_cuda_spec_defaults_are_fp16_and_channels_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a CUDA request resolves to (the trainer relies on it), without a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    spec = make_spec("train", device="cuda", normalization=IMAGENET)
    assert spec.device == torch.device("cuda", 0) and spec.on_cuda
    assert spec.dtype == torch.float16 and spec.channels_last
    assert make_spec("train", device="cuda", channels_last=False, dtype=torch.float32, normalization=IMAGENET).channels_last is False


# ---------------------------------------------------------------------------------------------
# 3. resident's one-time decode: batched (nvJPEG on CUDA) with a per-image CPU fallback


def _jpeg(i: int, h: int, w: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(textured(i, h, w)).convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(i: int, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(textured(i, h, w)).save(buf, "PNG")
    return buf.getvalue()


def _pil(row: int, blob: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(blob)) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


class FakeNvjpeg:
    """A batched decoder that refuses some images (as nvJPEG refuses CMYK) and, like decode_jpeg,
    returns nothing for a batch when any image in it fails."""

    def __init__(self, refuse: set[bytes]) -> None:
        self.refuse, self.calls, self.decoded = refuse, [], 0

    def __call__(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        self.calls.append(len(data))
        blobs = [bytes(d.numpy()) for d in data]
        if any(b in self.refuse for b in blobs):
            raise RuntimeError("nvjpegDecodeBatched failed: unsupported JPEG")
        self.decoded += len(blobs)
        return [_pil(-1, b) for b in blobs]


def test_batched_decode_falls_back_per_image_and_keeps_rows_aligned() -> None:
    from cornpipe.loaders.backends.resident_decode import decode_images

    sizes = [(20 + i, 30 - i) for i in range(7)]
    blobs = [_jpeg(i, h, w) for i, (h, w) in enumerate(sizes)]
    blobs[2] = _jpeg(2, *sizes[2], mode="CMYK")  # four components: never offered to nvJPEG
    blobs[3] = _jpeg(3, *sizes[3], mode="L")  # grey: offered, comes back as RGB
    blobs[5] = _png(5, *sizes[5])  # not a JPEG: never offered
    fake = FakeNvjpeg(refuse={blobs[4]})  # as nvJPEG refuses some progressive files
    cpu_rows = []

    def cpu(row: int, blob: bytes) -> torch.Tensor:
        cpu_rows.append(row)
        return _pil(row, blob)

    rows = list(range(100, 107))  # the split's rows: what error messages name
    got = decode_images(rows, blobs, np.array(sizes), cpu, decode_batch=fake)
    assert sorted(cpu_rows) == [102, 104, 105]  # the CMYK JPEG, the refused one and the PNG
    assert fake.calls == [5, 1, 1, 1, 1, 1] and fake.decoded == 4  # one batch of five, then one by one
    for i, image in enumerate(got):
        assert image.shape == (3, *sizes[i]) and image.dtype == torch.uint8
        assert torch.equal(image, _pil(i, blobs[i])), f"row {rows[i]} holds another image"


def test_batched_decode_result_of_the_wrong_size_falls_back() -> None:
    from cornpipe.loaders.backends.resident_decode import decode_images

    """A decoder that returns an image of another size (a wrong orientation, a bad header) must not
    put it in the store: the crop boxes were drawn for the header's size."""
    blobs = [_jpeg(i, 20, 30) for i in range(3)]

    def bad(data: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.zeros((3, 30, 20), dtype=torch.uint8) for _ in data]

    got = decode_images([0, 1, 2], blobs, np.array([(20, 30)] * 3), _pil, decode_batch=bad)
    assert all(torch.equal(g, _pil(i, b)) for i, (g, b) in enumerate(zip(got, blobs, strict=True)))


def test_resident_store_is_the_same_with_the_batched_decoder(textured_shards: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The resident backend's fill with a batched decoder (nvJPEG on CUDA, a fake here that refuses
    every third image) holds each image in its own row, as the CPU decode does."""
    plain = make_loader(textured_shards, "train", backend="resident", workers=1, normalization=IMAGENET, oversample="none")
    fakes = []

    def fake_decoder(device: torch.device) -> FakeNvjpeg:
        shards = plain._shards
        fakes.append(FakeNvjpeg({shards.read_image_bytes("train", r) for r in range(0, plain.rows, 3)}))
        return fakes[-1]

    monkeypatch.setattr(rl, "batch_decoder", fake_decoder)
    batched = make_loader(textured_shards, "train", backend="resident", workers=1, normalization=IMAGENET, oversample="none")
    try:
        assert fakes and fakes[0].decoded == plain.rows - len(range(0, plain.rows, 3))
        assert torch.equal(batched.store, plain.store)
        assert batched.sample_id_t.tolist() == plain.sample_id_t.tolist()
    finally:
        plain.close()
        batched.close()


def test_batch_decoder_is_nvjpeg_on_cuda_and_none_elsewhere() -> None:
    assert rl.batch_decoder(torch.device("cpu")) is None
    if torch.cuda.is_available():
        assert callable(rl.batch_decoder(torch.device("cuda", torch.cuda.current_device())))
    else:  # a CUDA device where nvJPEG cannot decode: one warning, then the CPU decode
        with pytest.warns(RuntimeWarning, match="nvJPEG cannot decode"):
            assert rl.batch_decoder(torch.device("cuda", 0)) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvjpeg_decode_matches_the_cpu_decode() -> None:
    from cornpipe.loaders.backends.resident_decode import decode_images

    sizes = [(40, 56), (56, 40), (33, 47), (64, 64)]
    blobs = [_jpeg(i, h, w) for i, (h, w) in enumerate(sizes)]
    blobs.append(_jpeg(9, 30, 20, mode="CMYK"))
    sizes.append((30, 20))
    dev = torch.device("cuda", torch.cuda.current_device())
    got = decode_images(list(range(len(blobs))), blobs, np.array(sizes), _pil,
                           decode_batch=rl.batch_decoder(dev))
    for i, image in enumerate(got):
        assert image.shape == (3, *sizes[i])
        diff = (image.cpu().float() - _pil(i, blobs[i]).float()).abs().mean().item()
        # nvJPEG's default upsamples 4:2:0 chroma without smoothing, PIL's libjpeg-turbo smooths ("fancy
        # upsampling"): libjpeg-turbo with fancy upsampling off (simplejpeg fastupsample=True) differs from
        # PIL by 2.44-3.10 grey levels on these JPEGs (docs/performance.md); 4.5 leaves ~1.4 for IDCT rounding
        assert diff < 4.5, f"image {i}: nvJPEG and PIL differ by {diff:.2f} grey levels on average"


# ---------------------------------------------------------------------------------------------
# 4. numba installed but broken: the CPU finish falls back to the tensor ops, with one warning


@pytest.fixture
def fresh_numba_state():
    finish_cpu._compiled.cache_clear()
    yield
    finish_cpu._compiled.cache_clear()  # the next test imports the real numba again


def test_broken_numba_falls_back_to_the_tensor_path_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                                     fresh_numba_state: None) -> None:
    monkeypatch.setattr(finish_cpu, "AVAILABLE", True)  # "installed" ...
    monkeypatch.setitem(sys.modules, "numba", None)  # ... but `import numba` fails
    gen = torch.Generator().manual_seed(2)
    pixels = torch.randint(0, 256, (4, 3, 10, 14), dtype=torch.uint8, generator=gen)
    factors = np.array([[1.2, 0.8, 1.1], [1, 1, 1], [0.8, 1.2, 0.9], [1.1, 1, 1]], np.float32)
    want = finish_batch(pixels, factors, fast=False, norm=IMAGENET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = finish_batch(pixels, factors, norm=IMAGENET)
        second = finish_batch(pixels, factors, channels_last=True, norm=IMAGENET)
    assert torch.allclose(first, want, atol=1e-5) and torch.allclose(second, want, atol=1e-5)
    numba_warnings = [w for w in caught if "numba" in str(w.message)]
    assert len(numba_warnings) == 1, [str(w.message) for w in caught]
    assert issubclass(numba_warnings[0].category, RuntimeWarning)
