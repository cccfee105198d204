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
- `torchvision` (vs `torch`): the `webdataset` library's pipeline over the tars, as its README writes
  it -- `wds.WebDataset(tars).shuffle(SHUFFLE_BUFFER).decode("pil").to_tuple("jpg", "cls")` mapped
  through torchvision.transforms.v2 (RandomResizedCrop on the PIL image, RandomHorizontalFlip,
  PILToTensor, ToDtype, Normalize) in a torch DataLoader (its default drop_last=False: each worker
  batches its own stream, and every batch is counted). Each worker reads its own tars
  (`wds.split_by_worker`, the tar order shuffled). A shard set with fewer tars than workers would
  leave workers idle (webdataset refuses an empty worker), so there every worker reads every tar
  and keeps every n-th sample (`wds.split_by_worker` over samples): each worker parses all the tars'
  headers and bytes, but decodes only its share. The row's `setup` says which. With `--source`/
  `--manifest` the same transform runs over the original files of the split (the torch-folder
  row's images) in a map-style Dataset: its row is `torchvision folder`, the torch-folder row's peer.

`--host-only` (`host_only=True`): every peer stops at uint8 crops on the host, (B, S, S, 3) NHWC,
as cornpipe's backends then do: ffcv-native without NormalizeImage (decoder -> flip -> ToTensor, FFCV's
own buffer handed out as FFCV does), dali-native with fn.flip in place of crop_mirror_normalize (HWC
uint8), torchvision without ToDtype and Normalize (the crop as PIL holds it, HWC).

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

# cornpipe backend -> its peer row, and the module each peer needs (torchvision itself is a core dependency)
PEER_OF: dict[str, str] = {"ffcv": "ffcv-native", "dali": "dali-native", "torch": "torchvision"}
PEER_MODULE: dict[str, str] = {"ffcv-native": "ffcv", "dali-native": "nvidia.dali", "torchvision": "webdataset"}
PEERS: tuple[str, ...] = tuple(PEER_OF.values())
SCALE = (0.35, 1.0)  # RandomResizedCrop area fraction, as AugmentConfig.scale
SHUFFLE_BUFFER = 1000  # samples in webdataset's shuffle buffer (the figure of its README)


class PeerBatch:
    """What measure_loader reads of a batch."""

    __slots__ = ("images", "position")

    def __init__(self, images: torch.Tensor, position: torch.Tensor) -> None:
        self.images = images  # (B, 3, S, S) float32, normalised; host-only: (B, S, S, 3) uint8
        self.position = position  # (B,) int64


@dataclass
class PeerLoader:
    """A library's own iterable, made to look like a cornpipe EpochLoader."""

    iterable: Any
    batches_per_epoch: int
    convert: Any  # library batch -> PeerBatch
    setup: str = ""  # how the peer was set up where it had a choice (the row's `setup`)

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


@dataclass(frozen=True)
class PeerRequest:
    """What every peer is asked for (the bench's LoaderBenchConfig, resolved)."""

    split: str
    batch_size: int
    size: int  # output side, px
    workers: int
    device: str
    seed: int
    host_only: bool  # uint8 (B, S, S, 3) crops on the host, no normalisation


def peer_unusable(name: str, root: str, split: str) -> str | None:
    """Why peer `name` cannot read `split` of the shard set at `root` (checked before any process starts), or None."""
    if name != "torchvision":
        return None
    shards = ShardSet(Path(root))
    pairs = shards.shards(split) if split in shards.splits else []
    if pairs and F.TAR_CLASS_EXT not in shards.index(pairs[0][1])[0]:
        return (f"{root} predates the .cls members webdataset decodes (format version "
                f"{shards.manifest['format_version']}); convert again for this peer")
    return None


def build_peer(name: str, root: str, *, split: str, batch_size: int, image_size: int, workers: int,
               device: str, seed: int, host_only: bool = False, folder: bool = False) -> PeerLoader:
    """Peer `name` over the shard set at `root`; `folder`: the torchvision peer over the original
    images at `root` (a folder, or a manifest CSV), the split the torch-folder baseline reads."""
    req = PeerRequest(split, batch_size, image_size, workers, device, seed, host_only)
    if host_only and device != "cpu":
        raise LoaderError(f"host-only batches stay on the host; got device {device}")
    if folder:
        if name != "torchvision":
            raise LoaderError(f"peer {name} does not read image folders (only torchvision does)")
        return _torchvision_folder(Path(root), req)
    shards = ShardSet(Path(root))
    if split not in shards.splits:
        raise LoaderError(f"unknown split {split!r} (this shard set has: {', '.join(shards.splits)})")
    build = {"ffcv-native": _ffcv, "dali-native": _dali, "torchvision": _torchvision}[name]
    return build(shards, req)


def _ffcv(shards: ShardSet, req: PeerRequest) -> PeerLoader:
    try:
        from ffcv.fields.basics import FloatDecoder, IntDecoder
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage
    except ImportError as exc:
        raise MissingDependency(f"ffcv-native needs ffcv ({exc})") from exc
    size = req.size
    image: list[Any] = [RandomResizedCropRGBImageDecoder((size, size), scale=SCALE), RandomHorizontalFlip()]
    mean, std = np.array(MEAN_255), np.array(STD_255)
    if req.host_only:  # (B, S, S, 3) uint8: FFCV's own batch buffer, as its users get it
        image += [ToTensor()]
    elif req.device.startswith("cuda"):  # as in ffcv-imagenet
        image += [ToTensor(), ToDevice(torch.device(req.device), non_blocking=True), ToTorchImage(),
                  NormalizeImage(mean, std, np.float32)]
    else:  # NormalizeImage's CPU code is a numba loop over uint8 HWC arrays: it runs before ToTensor there
        image += [NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]
    pipelines: dict[str, Any] = {F.IMAGE: image, F.POSITION: [IntDecoder(), ToTensor()],
                                 F.GRADE: [FloatDecoder(), ToTensor()], F.SAMPLE_ID: None, F.SOURCE_ID: None}
    loader = Loader(str(shards.beton_path(req.split)), batch_size=req.batch_size, num_workers=req.workers,
                    order=OrderOption.RANDOM, os_cache=True, drop_last=True, pipelines=pipelines, seed=req.seed)
    # ToTensor after NormalizeImage shares FFCV's reused output buffer; measure_loader only counts it
    return PeerLoader(loader, shards.count(req.split) // req.batch_size, lambda b: PeerBatch(b[0], b[1].view(-1).long()))


def _dali(shards: ShardSet, req: PeerRequest) -> PeerLoader:
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as exc:
        raise MissingDependency(f"dali-native needs nvidia-dali ({exc})") from exc
    cuda = req.device.startswith("cuda")
    pairs = shards.shards(req.split)

    @pipeline_def(batch_size=req.batch_size, num_threads=req.workers, seed=req.seed,
                  device_id=torch.device(req.device).index or 0 if cuda else None)
    def pipe() -> tuple[Any, Any]:
        jpeg, position = fn.readers.webdataset(
            paths=[str(t) for t, _ in pairs], index_paths=[str(i) for _, i in pairs],
            ext=[F.TAR_IMAGE_EXT, F.TAR_POSITION_EXT], random_shuffle=True, name="Reader")
        images = fn.decoders.image_random_crop(jpeg, device="mixed" if cuda else "cpu", output_type=types.RGB,
                                               random_area=list(SCALE))
        images = fn.resize(images, resize_x=req.size, resize_y=req.size)
        if req.host_only:  # (S, S, 3) uint8, mirrored or not
            images = fn.flip(images, horizontal=fn.random.coin_flip())
        else:
            images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(), mean=list(MEAN_255),
                                              std=list(STD_255), dtype=types.FLOAT, output_layout="CHW")
        return images, position

    iterator = DALIGenericIterator(pipe(), ["images", "position"], reader_name="Reader", auto_reset=True,
                                   last_batch_policy=LastBatchPolicy.DROP)
    # the .position member is 8 bytes of little-endian int64
    return PeerLoader(iterator, shards.count(req.split) // req.batch_size,
                      lambda b: PeerBatch(b[0]["images"], b[0]["position"].view(torch.int64).view(-1)))


def _transform(size: int, host_only: bool) -> Any:
    """torchvision's train recipe on a PIL image; host-only: the crop as a (S, S, 3) uint8 tensor."""
    from torchvision.transforms import v2

    geometry = [v2.RandomResizedCrop(size, scale=SCALE, antialias=True), v2.RandomHorizontalFlip()]
    if host_only:
        return v2.Compose([*geometry, _pil_to_hwc])
    return v2.Compose([*geometry, v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize([m / 255 for m in MEAN_255], [s / 255 for s in STD_255])])


def _pil_to_hwc(image: Any) -> torch.Tensor:
    """A PIL image -> (H, W, 3) uint8, as PIL holds it (default_collate stacks these to NHWC)."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))


def _batches(dataset: Any, req: PeerRequest, **options: Any) -> tuple[Any, Any]:
    """The torch DataLoader a torchvision user writes around `dataset`, and its batch -> PeerBatch."""
    cuda = req.device.startswith("cuda")
    loader = torch.utils.data.DataLoader(dataset, batch_size=req.batch_size, num_workers=req.workers,
                                         pin_memory=cuda, persistent_workers=req.workers > 0, **options)
    if cuda:
        return loader, lambda b: PeerBatch(b[0].to(req.device, non_blocking=True), torch.as_tensor(b[1]))
    return loader, lambda b: PeerBatch(b[0], torch.as_tensor(b[1]))


def _torchvision(shards: ShardSet, req: PeerRequest) -> PeerLoader:
    try:
        import webdataset as wds
    except ImportError as exc:
        raise MissingDependency(f"the torchvision peer reads the tars with webdataset: pip install webdataset "
                                f"({exc})") from exc
    tars = [str(tar) for tar, _ in shards.shards(req.split)]
    counts = [int(e["count"]) for e in shards.manifest["splits"][req.split]["shards"]]  # samples per tar
    workers = max(1, req.workers)
    if len(tars) >= workers:  # webdataset's way: each worker its own tars, in shuffled order
        dataset = wds.WebDataset(tars, shardshuffle=len(tars), workersplitter=wds.split_by_worker, seed=req.seed)
        per_worker = [sum(counts[w::workers]) for w in range(workers)]
        setup = f"{_n(len(tars), 'tar')} over {_n(req.workers, 'worker')}: tars split by worker"
    else:  # every worker reads every tar in the same order and keeps its own n-th of the samples
        dataset = wds.WebDataset(tars, shardshuffle=False, workersplitter=None).compose(wds.split_by_worker)
        per_worker = [len(range(w, sum(counts), workers)) for w in range(workers)]
        setup = (f"{_n(len(tars), 'tar')} for {_n(req.workers, 'worker')}: every worker reads "
                 f"every tar and decodes 1/{req.workers} of the samples (convert with --shard-size "
                 f"<= {sum(counts) // workers} for a tar per worker)")
    dataset = (dataset.shuffle(SHUFFLE_BUFFER).decode("pil").to_tuple(F.TAR_IMAGE_EXT, F.TAR_CLASS_EXT)
               .map_tuple(_transform(req.size, req.host_only), None))
    # DataLoader's default drop_last=False: each worker batches its own stream, so drop_last would decode a
    # partial batch per worker and throw it away; every batch is counted, whatever its size
    loader, convert = _batches(dataset, req)
    return PeerLoader(loader, sum(-(-n // req.batch_size) for n in per_worker), convert, setup)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class _Files(torch.utils.data.Dataset):
    """Original image files by index: PIL-decoded, transformed (a torchvision user's file-list dataset)."""

    def __init__(self, paths: list[str], position: list[int], transform: Any) -> None:
        self.paths, self.position, self.transform = paths, position, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, ImageOps

        with Image.open(self.paths[i]) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")
        return self.transform(image), self.position[i]


def _torchvision_folder(source: Path, req: PeerRequest) -> PeerLoader:
    """The torchvision peer over the original files of the split the torch-folder row reads
    (`loaders.backends.folder.build_folder`: discovery, then convert's split with its default fraction and seed)."""
    from cornpipe.loaders.backends.folder import folder_split

    samples, _ = folder_split(None if source.is_file() else source, req.split,
                              manifest_csv=source if source.is_file() else None)
    dataset = _Files([str(s.path) for s in samples], [int(s.position) for s in samples],
                     _transform(req.size, req.host_only))
    loader, convert = _batches(dataset, req, shuffle=True, drop_last=True,
                               generator=torch.Generator().manual_seed(req.seed))
    return PeerLoader(loader, len(samples) // req.batch_size, convert, f"{len(samples)} original files, map-style")
