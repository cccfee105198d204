"""The peer rows of `cornpipe bench loaders`: each library's own pipeline over the same shard set.

A peer is what a user of that library would write without cornpipe, doing the same work as
`--work same` asks of cornpipe's backends (RandomResizedCrop to S px, scale 0.35-1, a random
horizontal flip, normalise to float32 NCHW), so `× peer` says what cornpipe's backend adds or costs
over its own library:

- `ffcv-native` (vs `ffcv`): FFCV's Loader over the split's .beton, RandomResizedCropRGBImageDecoder
  -> RandomHorizontalFlip -> NormalizeImage -> ToTensor -> ToTorchImage (NCHW, channels_last view),
  labels through IntDecoder/FloatDecoder, order RANDOM, os_cache.
- `dali-native` (vs `dali`): a DALI pipeline, fn.readers.webdataset over the tars and their .idx,
  fn.decoders.image_random_crop -> fn.resize -> fn.crop_mirror_normalize (coin-flip mirror, float,
  CHW), through DALIGenericIterator; CPU operators without a GPU (device_id=None), "mixed" decode on one.
- `torchvision` (vs `torch`): a torch DataLoader whose dataset reads each JPEG by index from the
  tars (ShardSet.read_image_bytes), decodes it with PIL and applies torchvision.transforms.v2.

Each peer is wrapped to look like a cornpipe loader (`len`, `set_epoch`, iteration yielding objects
with `.images` and `.position`, `close`), so `loader_bench.measure_loader` times it exactly as it
times a backend, in a fresh process.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cornpipe.errors import LoaderError, MissingDependency
from cornpipe.loaders.base import MEAN_255, STD_255
from cornpipe.shards import fields as F
from cornpipe.shards.shard_set import ShardSet

# peer row -> the cornpipe backend it is compared with, and the module it needs
PEER_OF: dict[str, str] = {"ffcv": "ffcv-native", "dali": "dali-native", "torch": "torchvision"}
PEER_MODULE: dict[str, str] = {"ffcv-native": "ffcv", "dali-native": "nvidia.dali", "torchvision": "torchvision"}
PEERS: tuple[str, ...] = tuple(PEER_OF.values())
SCALE = (0.35, 1.0)  # RandomResizedCrop area fraction, as AugmentConfig.scale


class PeerBatch:
    """What measure_loader reads of a batch."""

    __slots__ = ("images", "position")

    def __init__(self, images: torch.Tensor, position: torch.Tensor) -> None:
        self.images = images  # (B, 3, S, S) float32, normalised
        self.position = position  # (B,) int64


@dataclass
class PeerLoader:
    """A library's own iterable, made to look like a cornpipe EpochLoader."""

    iterable: Any
    batches_per_epoch: int
    convert: Any  # library batch -> PeerBatch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:  # each library reshuffles on its own
        pass

    def __iter__(self) -> Iterator[PeerBatch]:
        for n, batch in enumerate(self.iterable):
            if n >= self.batches_per_epoch:  # DALI may end an epoch a batch later than drop_last would
                break
            yield self.convert(batch)

    def close(self) -> None:
        self.iterable = None


def build_peer(name: str, root: str, *, split: str, batch_size: int, image_size: int, workers: int,
               device: str, seed: int) -> PeerLoader:
    shards = ShardSet(Path(root))
    if split not in shards.splits:
        raise LoaderError(f"unknown split {split!r} (this shard set has: {', '.join(shards.splits)})")
    per_epoch = shards.count(split) // batch_size
    build = {"ffcv-native": _ffcv, "dali-native": _dali, "torchvision": _torchvision}[name]
    iterable, convert = build(shards, split, batch_size, image_size, workers, device, seed)
    return PeerLoader(iterable, per_epoch, convert)


def _ffcv(shards: ShardSet, split: str, batch_size: int, size: int, workers: int, device: str,
          seed: int) -> tuple[Any, Any]:
    try:
        from ffcv.fields.basics import FloatDecoder, IntDecoder
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage
    except ImportError as exc:
        raise MissingDependency(f"ffcv-native needs ffcv ({exc})") from exc
    # NormalizeImage's CPU code is a numba loop over uint8 HWC arrays: it runs before ToTensor there
    # (after ToDevice + ToTorchImage on CUDA, as in ffcv-imagenet)
    image: list[Any] = [RandomResizedCropRGBImageDecoder((size, size), scale=SCALE), RandomHorizontalFlip()]
    mean, std = np.array(MEAN_255), np.array(STD_255)
    if device.startswith("cuda"):
        image += [ToTensor(), ToDevice(torch.device(device), non_blocking=True), ToTorchImage(),
                  NormalizeImage(mean, std, np.float32)]
    else:
        image += [NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]
    pipelines: dict[str, Any] = {F.IMAGE: image, F.POSITION: [IntDecoder(), ToTensor()],
                                 F.GRADE: [FloatDecoder(), ToTensor()], F.SAMPLE_ID: None, F.SOURCE_ID: None}
    loader = Loader(str(shards.beton_path(split)), batch_size=batch_size, num_workers=workers,
                    order=OrderOption.RANDOM, os_cache=True, drop_last=True, pipelines=pipelines, seed=seed)
    # ToTensor after NormalizeImage shares FFCV's reused output buffer; measure_loader only counts it
    return loader, lambda b: PeerBatch(b[0], b[1].view(-1).long())


def _dali(shards: ShardSet, split: str, batch_size: int, size: int, workers: int, device: str,
          seed: int) -> tuple[Any, Any]:
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as exc:
        raise MissingDependency(f"dali-native needs nvidia-dali ({exc})") from exc
    cuda = device.startswith("cuda")
    pairs = shards.shards(split)

    @pipeline_def(batch_size=batch_size, num_threads=workers, seed=seed,
                  device_id=torch.device(device).index or 0 if cuda else None)
    def pipe() -> tuple[Any, Any]:
        jpeg, position = fn.readers.webdataset(
            paths=[str(t) for t, _ in pairs], index_paths=[str(i) for _, i in pairs],
            ext=[F.TAR_IMAGE_EXT, F.TAR_POSITION_EXT], random_shuffle=True, name="Reader")
        images = fn.decoders.image_random_crop(jpeg, device="mixed" if cuda else "cpu", output_type=types.RGB,
                                               random_area=list(SCALE))
        images = fn.resize(images, resize_x=size, resize_y=size)
        images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(), mean=list(MEAN_255),
                                          std=list(STD_255), dtype=types.FLOAT, output_layout="CHW")
        return images, position

    iterator = DALIGenericIterator(pipe(), ["images", "position"], reader_name="Reader", auto_reset=True,
                                   last_batch_policy=LastBatchPolicy.DROP)
    # the .position member is 8 bytes of little-endian int64
    return iterator, lambda b: PeerBatch(b[0]["images"], b[0]["position"].view(torch.int64).view(-1))


class _TarImages(torch.utils.data.Dataset):
    """Row r of a split: its JPEG read from the tar by the index's offset, PIL-decoded, transformed."""

    def __init__(self, shards: ShardSet, split: str, transform: Any) -> None:
        self.shards, self.split, self.transform = shards, split, transform
        self.position = torch.from_numpy(shards.labels(split)[0].astype(np.int64))

    def __len__(self) -> int:
        return len(self.position)

    def __getitem__(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(self.shards.read_image_bytes(self.split, row))) as im:
            image = im.convert("RGB")
        return self.transform(image), self.position[row]


def _torchvision(shards: ShardSet, split: str, batch_size: int, size: int, workers: int, device: str,
                 seed: int) -> tuple[Any, Any]:
    try:
        from torchvision.transforms import v2
    except ImportError as exc:
        raise MissingDependency(f"the torchvision peer needs torchvision ({exc})") from exc
    transform = v2.Compose([
        v2.RandomResizedCrop(size, scale=SCALE, antialias=True),  # on the PIL image, as torchvision's recipes
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([m / 255 for m in MEAN_255], [s / 255 for s in STD_255]),
    ])
    cuda = device.startswith("cuda")
    loader = torch.utils.data.DataLoader(
        _TarImages(shards, split, transform), batch_size=batch_size, shuffle=True, num_workers=workers,
        drop_last=True, pin_memory=cuda, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed))
    if cuda:
        return loader, lambda b: PeerBatch(b[0].to(device, non_blocking=True), b[1])
    return loader, lambda b: PeerBatch(b[0], b[1])
