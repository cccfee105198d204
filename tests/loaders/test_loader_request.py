"""A loader request is one LoaderSpec, resolved once, and every backend obeys what it says -- including
the run's own choices of device layout, which the loader must not re-derive from the device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import needs_library

from cornpipe.errors import LoaderError
from cornpipe.loaders import LoaderSpec, make_loader
from cornpipe.loaders.backends.folder import make_folder_loader
from cornpipe.loaders.base import IMAGENET

BACKENDS = ("torch", "resident", "ffcv", "dali")


def _first_images(loader) -> torch.Tensor:
    try:
        return next(iter(loader)).images
    finally:
        loader.close()


@pytest.mark.parametrize("channels_last", [True, False, None])
@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_have_the_memory_format_the_request_names(backend: str, channels_last: bool | None,
                                                          tiny_shards: Path) -> None:
    """`--channels-last`/`--no-channels-last` reach the batches; None means the device's default (CPU: NCHW)."""
    needs_library(backend)
    loader = make_loader(tiny_shards, "train", backend=backend, batch_size=4, image_size=32, workers=1,
                         channels_last=channels_last, normalization=IMAGENET, oversample="none")
    assert loader.spec.channels_last is bool(channels_last)
    images = _first_images(loader)  # (B, 3, H, W)
    assert images.shape == (4, 3, 32, 32)
    assert images.is_contiguous(memory_format=torch.channels_last) is bool(channels_last)
    assert images.is_contiguous() is not bool(channels_last)


def test_the_folder_loader_takes_the_same_request(synth_raw: Path) -> None:
    loader = make_folder_loader(synth_raw, "val", batch_size=3, image_size=24, workers=0, channels_last=True,
                                val_fraction=0.5, split_seed=1, normalization=IMAGENET, oversample="none")
    assert loader.spec.options["val_fraction"] == 0.5
    assert _first_images(loader).is_contiguous(memory_format=torch.channels_last)


def test_a_whole_spec_can_be_passed_and_overridden(tiny_shards: Path) -> None:
    spec = LoaderSpec(split="val", batch_size=5, image_size=24, workers=0, normalization=IMAGENET, oversample="none")
    loader = make_loader(tiny_shards, spec, backend="torch", batch_size=2)
    assert (loader.spec.split, loader.spec.batch_size, loader.spec.image_size) == ("val", 2, 24)
    assert loader.spec.augment is None and loader.spec.shuffle is False  # validation defaults, resolved
    assert _first_images(loader).shape == (2, 3, 24, 24)


def test_an_unknown_option_is_a_one_line_error(tiny_shards: Path) -> None:
    with pytest.raises(LoaderError, match=r"^unknown loader option\(s\) batchsize; valid: .*batch_size"):
        make_loader(tiny_shards, "train", backend="torch", batchsize=4, normalization=IMAGENET, oversample="none")


def test_a_request_without_normalization_is_an_error_never_imagenet(tiny_shards: Path) -> None:
    """The statistics are the trunk's: a caller that forgets them gets an error, not ImageNet's silently."""
    with pytest.raises(LoaderError, match=r"^a loader needs normalization="):
        make_loader(tiny_shards, "train", backend="torch", batch_size=4)
    with pytest.raises(LoaderError, match=r"^a loader needs normalization="):
        make_folder_loader(tiny_shards, "all")
    with pytest.raises(LoaderError, match=r"^normalization must be a loaders.base.Normalization"):
        make_loader(tiny_shards, "train", backend="torch", normalization=None)
    with pytest.raises(TypeError, match="normalization"):
        LoaderSpec(split="train")  # type: ignore[call-arg]


def test_a_loader_and_the_trainer_share_one_oversample_default_and_one_size_rule() -> None:
    """Leaving out oversample gives what the trainer's config gives ('balanced'), and the smallest image
    size is one constant both check against."""
    from cornpipe.loaders.base import DEFAULT_OVERSAMPLE, MIN_IMAGE_SIZE
    from cornpipe.loaders.common import make_spec

    assert make_spec("train", normalization=IMAGENET).oversample == DEFAULT_OVERSAMPLE == "balanced"
    assert make_spec("train", normalization=IMAGENET, image_size=MIN_IMAGE_SIZE).image_size == MIN_IMAGE_SIZE
    with pytest.raises(LoaderError, match=f"image_size must be >= {MIN_IMAGE_SIZE} px"):
        make_spec("train", normalization=IMAGENET, image_size=MIN_IMAGE_SIZE - 1)


def test_the_trainer_passes_its_channels_last_choice_to_both_loaders(tiny_shards: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU channels_last is on by default (measured faster there); `--no-channels-last` must give NCHW
    batches to both loaders, as the model then expects (the loaders are requested in runs.session.setup)."""
    import cornpipe.runs.session as session_module
    import cornpipe.train as train_module
    from cornpipe.runs.config import TrainConfig

    seen: list[tuple[str, bool]] = []
    real = session_module.make_loader

    def recording(shards, split, **kwargs):
        loader = real(shards, split, **kwargs)
        seen.append((split, loader.spec.channels_last))
        return loader

    monkeypatch.setattr(session_module, "make_loader", recording)
    cfg = TrainConfig(shards=str(tiny_shards), out=str(tmp_path / "run"), model="resnet_plus_tiny", image_size=32,
                      batch_size=8, epochs=1, max_batches=1, workers=0, device="cpu", channels_last=False,
                      compile=False, bootstrap=0)
    train_module.train(cfg)
    assert seen == [("train", False), ("val", False)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_are_normalised_with_the_requested_statistics(backend: str, tiny_shards: Path) -> None:
    """A pretrained trunk's mean/std (here timm's 0.5/0.5) replace ImageNet's in every backend."""
    from cornpipe.loaders.base import Normalization

    needs_library(backend)
    half = Normalization.from_unit((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    args = dict(backend=backend, batch_size=6, image_size=32, workers=1, oversample="none")
    imagenet = _first_images(make_loader(tiny_shards, "val", normalization=IMAGENET, **args)).float()
    mine = _first_images(make_loader(tiny_shards, "val", normalization=half, **args)).float()

    def pixels(x: torch.Tensor, norm: Normalization) -> torch.Tensor:
        return x * torch.tensor(norm.std).view(1, 3, 1, 1) + torch.tensor(norm.mean).view(1, 3, 1, 1)

    assert mine.min() >= -1.0 - 1e-4 and mine.max() <= 1.0 + 1e-4  # (x - 127.5) / 127.5
    torch.testing.assert_close(pixels(mine, half), pixels(imagenet, IMAGENET), atol=0.05, rtol=0)
