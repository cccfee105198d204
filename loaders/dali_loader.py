"""`dali` backend: a DALI pipeline over the split's tar shards.

Two ways to feed the pipeline (`options={"reader": ...}`):

- "external" (default, every strategy): a parallel `fn.external_source` (loaders.dali_source) reads
  each sample's JPEG by random access through the shards' DALI index, for exactly the rows
  `loaders.sampling` draws for (seed, epoch, rank) -- the same epochs as every other backend,
  oversampling included -- with the shared augmentation draws (replayable with the epoch).
- "webdataset" (oversample "none" only): DALI's own `fn.readers.webdataset` over tar + .idx, with
  DALI's random operators for the augmentation. Each sample once per epoch (reader padding +
  partial last batch), ranks read disjoint fixed shards (`stick_to_shard`), but the order is the
  reader's shuffle buffer, not the shared draw, and epochs cannot be replayed: a throughput mode.

Graph (both): decode (`device="mixed"`, nvJPEG, on CUDA; libjpeg-turbo on CPU) -> resize of the crop
box to (S, S) with antialiasing (flips are reversed ROI edges) -> rot90 (`fn.rotate`, nearest,
only when enabled). DALI hands (B, S, S, 3) uint8 to torch on the device; colour jitter and
normalisation then run there as batched tensor ops (loaders.augment), as on the ffcv/torch backends,
so every backend shares one definition of the jitter.

Without a GPU the same graph runs on CPU (`device_id=None`). DALI's Python workers start by fork
on CPU (fast) and by spawn once CUDA is initialised (fork is unsafe then); `options["py_start_method"]`
overrides. The pipeline (and its workers) is built at the first epoch and torn down by close().
"""

from __future__ import annotations

import io
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cornpipe.errors import LoaderError, MissingDependency, install_hint
from cornpipe.loaders.base import Batch
from cornpipe.loaders.common import AUGMENT_STREAM, EpochLoader, LoaderSpec, source_rows
from cornpipe.loaders.dali_source import ERROR_MARK, EpochPlan, EpochSource, SourceSpec
from cornpipe.loaders.finish import Finisher
from cornpipe.shards import fields as F
from cornpipe.shards.shard_set import parse_dali_index

try:
    from nvidia.dali import backend as dali_backend
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy, feed_ndarray
except ImportError as exc:  # pragma: no cover - exercised by the missing-library test
    raise MissingDependency(
        f"the dali backend needs NVIDIA DALI ({exc.name} is missing): {install_hint('dali')}"
    ) from exc

READERS: tuple[str, ...] = ("external", "webdataset")
PREFETCH = 2  # batches DALI prepares ahead (pipeline queue and external-source queue)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((ln.strip() for ln in text if ln.strip() and "Traceback" not in ln), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _worker_error(exc: BaseException) -> str | None:
    """The message of a LoaderError raised in a DALI worker (carried as text through the chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if ERROR_MARK in text:
            return text.split(ERROR_MARK, 1)[1].strip().splitlines()[0]
        exc = exc.__cause__ or exc.__context__
    return None


def index_shards(shards, split: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(tar paths, shard of row, JPEG offset, JPEG size) of every row; one-line LoaderError naming
    the file when a tar or index is missing, cut short or disagrees with the manifest."""
    tars, shard, offset, size = [], [], [], []
    for k, (tar, idx) in enumerate(shards.shards(split)):
        tar, idx = Path(tar), Path(idx)
        if not tar.is_file():
            raise LoaderError(f"shard {tar} is missing")
        entries = parse_dali_index(idx)
        try:
            spans = np.array([e[F.TAR_IMAGE_EXT] for e in entries], dtype=np.int64).reshape(-1, 2)
        except KeyError:
            raise LoaderError(f"index file {idx} is corrupt (a sample has no '{F.TAR_IMAGE_EXT}')") from None
        if len(spans) and int((spans[:, 0] + spans[:, 1]).max()) > tar.stat().st_size:
            raise LoaderError(f"shard {tar} is truncated (its index points past the end of the file)")
        tars.append(str(tar))
        shard.append(np.full(len(spans), k, dtype=np.int32))
        offset.append(spans[:, 0])
        size.append(spans[:, 1])
    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    shard_a, offset_a, size_a = cat(shard, np.int32), cat(offset, np.int64), cat(size, np.int64)
    if len(shard_a) != shards.count(split):
        raise LoaderError(f"the {split} shards index {len(shard_a)} samples but manifest.json lists "
                          f"{shards.count(split)}")
    return tars, shard_a, offset_a, size_a


def _row_locations(shards, locations: list[tuple[str, int]]) -> tuple[list[str], np.ndarray, ...]:
    """(tar paths, shard of row, JPEG offset, JPEG size, stored (h, w)) of each (split, row) in
    `locations`: the rows of one split, or any sample ids from both (cross-validation folds)."""
    tars: list[str] = []
    per_split: dict[str, tuple[np.ndarray, ...]] = {}
    for split in dict.fromkeys(s for s, _ in locations):  # the splits used, in first-use order
        split_tars, shard, offset, size = index_shards(shards, split)
        hw = np.array([[s["height"], s["width"]] for s in shards.samples(split)], dtype=np.int64).reshape(-1, 2)
        per_split[split] = (shard + len(tars), offset, size, hw)  # shard numbers into the joint tar list
        tars += split_tars

    def column(k: int, dtype: type) -> np.ndarray:
        return np.array([per_split[s][k][r] for s, r in locations], dtype=dtype)

    return (tars, column(0, np.int32), column(1, np.int64), column(2, np.int64),
            column(3, np.int64).reshape(-1, 2))


class DaliLoader(EpochLoader):
    """The split's tar shards through a DALI pipeline; yields `Batch`es on `spec.device`."""

    def __init__(self, shards, spec: LoaderSpec) -> None:
        locations, position, grade, sample_id = source_rows(shards, spec)  # a split, or any sample ids
        super().__init__(spec, position, grade, sample_id)
        self.shards = shards
        self.reader = str(spec.options.get("reader", "external"))
        if self.reader not in READERS:
            raise LoaderError(f"unknown DALI reader {self.reader!r}; valid: {', '.join(READERS)}")
        if self.reader == "webdataset" and spec.oversample != "none":
            raise LoaderError(f"the DALI webdataset reader cannot oversample ({spec.oversample!r}); "
                              f"use the default external-source reader")
        if self.reader == "webdataset" and spec.sample_ids is not None:
            raise LoaderError("the DALI webdataset reader reads whole splits; use the default external-source "
                              "reader for a subset of sample ids")
        self.tars, shard, offset, size, hw = _row_locations(shards, locations)
        self.workers = max(1, int(spec.workers))
        self.start_method: str | None = spec.options.get("py_start_method")  # None: decided at build
        self._tmp = Path(tempfile.mkdtemp(prefix="cornpipe-dali-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._tmp), True)
        self.plan = EpochPlan(self._tmp / "plan.bin")
        self.source_spec = SourceSpec(loader=spec, tars=self.tars, shard=shard, offset=offset, size=size, hw=hw,
                                      position=self.position, grade=self.grade, plan=str(self.plan.path))
        self._pipe: Pipeline | None = None
        self._wds_iter: DALIGenericIterator | None = None
        self._dali_epoch = 0  # DALI's own epoch counter (one per pipeline reset)
        self._open: dict | None = None  # the epoch being iterated: dali_epoch, epoch, batches left
        self._finish = Finisher(spec.device, spec.dtype, jitter=spec.augment is not None,
                                channels_last=spec.channels_last, norm=spec.normalization)

    # -- the DALI graph ------------------------------------------------------------------------

    def _decode_geometry(self, jpeg, roi_start=None, roi_end=None, angle=None):
        s = self.spec
        images = fn.decoders.image(jpeg, device="mixed" if s.on_cuda else "cpu", output_type=types.RGB)
        if roi_start is not None:  # external source: the shared augmentation draws
            images = fn.resize(images, size=[s.image_size] * 2, roi_start=roi_start, roi_end=roi_end,
                               roi_relative=False, antialias=True)
            if angle is not None:
                images = fn.rotate(images, angle=angle, keep_size=True, interp_type=types.INTERP_NN)
            return images
        aug = s.augment  # webdataset reader: DALI's own random operators
        if aug is None:
            images = fn.resize(images, resize_shorter=s.image_size / s.val_crop_fraction, antialias=True)
            return fn.crop(images, crop=[s.image_size] * 2)
        images = fn.random_resized_crop(images, size=[s.image_size] * 2, random_area=list(aug.scale),
                                        random_aspect_ratio=list(aug.ratio), antialias=True)
        if aug.hflip or aug.vflip:
            images = fn.flip(images, horizontal=fn.random.coin_flip() if aug.hflip else 0,
                             vertical=fn.random.coin_flip() if aug.vflip else 0)
        if aug.rot90:
            angle = fn.random.uniform(values=[0.0, 90.0, 180.0, 270.0])
            images = fn.rotate(images, angle=angle, keep_size=True, interp_type=types.INTERP_NN)
        return images

    def _start_method(self) -> str:
        """fork (fast) unless CUDA is up in this process by now (e.g. torch, FFCV's streams, another
        DALI GPU pipeline): forking then is unsafe and DALI refuses it."""
        if self.start_method is not None:
            return str(self.start_method)
        cuda_up = dali_backend.IsDriverInitialized() or (torch.cuda.is_available() and torch.cuda.is_initialized())
        return "spawn" if self.spec.on_cuda or cuda_up else "fork"

    def _build(self) -> Pipeline:
        s = self.spec
        pipe = Pipeline(batch_size=s.batch_size, num_threads=self.workers,
                        device_id=s.device.index if s.on_cuda else None,
                        seed=(s.seed * 1_000_003 + s.rank) % (2**31 - 1), prefetch_queue_depth=PREFETCH,
                        py_num_workers=self.workers, py_start_method=self._start_method())
        with pipe:
            if self.reader == "external":
                rotates = self.source_spec.rotates
                jpeg, row, roi_start, roi_end, jitter, *angle = fn.external_source(
                    source=EpochSource(self.source_spec), num_outputs=6 if rotates else 5, parallel=True,
                    batch=False, prefetch_queue_depth=PREFETCH,
                    dtype=[types.UINT8, types.INT64] + [types.FLOAT] * (4 if rotates else 3))
                images = self._decode_geometry(jpeg, roi_start, roi_end, angle[0] if angle else None)
                pipe.set_outputs(images, row, jitter)
            else:
                jpeg, position, grade, sample_id = fn.readers.webdataset(
                    paths=self.tars, index_paths=[str(i) for _, i in self.shards.shards(s.split)],
                    ext=[F.TAR_IMAGE_EXT, F.TAR_POSITION_EXT, F.TAR_GRADE_EXT, F.TAR_ID_EXT],
                    dtypes=[types.UINT8, types.INT64, types.FLOAT, types.INT64], name="reader",
                    random_shuffle=s.shuffle, initial_fill=min(1024, max(1, self.rows)), seed=s.seed + s.rank,
                    shard_id=s.rank, num_shards=s.world_size, stick_to_shard=True, pad_last_batch=True,
                    missing_component_behavior="error")
                pipe.set_outputs(self._decode_geometry(jpeg), position, grade, sample_id)
        try:
            pipe.build()
        except Exception as exc:
            raise LoaderError(f"DALI cannot build the {s.split} pipeline: {_one_line(exc)}") from exc
        return pipe

    # -- epochs -----------------------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        if self.reader == "webdataset":  # DALI's contiguous shard of this rank
            n, r, w = self.rows, self.spec.rank, self.spec.world_size
            return n * (r + 1) // w - n * r // w
        return super().num_samples

    def _to_torch(self, images) -> torch.Tensor:
        """DALI's (B, S, S, 3) uint8 batch -> a torch tensor on the device, as DALI's own torch iterator
        does it: zero-copy DLPack (stream-ordered, keeps DALI's buffer alive) under DALI's dynamic
        executor, else a copy on torch's current stream."""
        tensor = images.as_tensor()
        dev = self.spec.device
        if self._pipe.exec_dynamic:
            if self.spec.on_cuda:
                with torch.cuda.device(dev):
                    return torch.from_dlpack(tensor)
            return torch.from_dlpack(tensor)
        out = torch.empty(tensor.shape(), dtype=torch.uint8, device=dev)
        stream = torch.cuda.current_stream(dev) if self.spec.on_cuda else None
        return feed_ndarray(tensor, out, cuda_stream=stream)

    def __iter__(self) -> Iterator[Batch]:
        if self._tmp is None:
            raise LoaderError("this dali loader is closed")
        if self.reader == "webdataset":
            yield from self._iter_webdataset()
            return
        self._close_open_epoch()  # a previous pass of this loader that was not run to its end
        epoch, nb = self.epoch, len(self)
        if nb == 0:
            return
        if self._pipe is None:
            self.plan.write(self._dali_epoch, epoch, True)
            self._pipe = self._build()
        self.plan.write(self._dali_epoch, epoch, True)
        state = self._open = {"dali_epoch": self._dali_epoch, "epoch": epoch, "left": nb}
        try:
            for b in range(nb):
                images, rows, jitter = self._run(epoch, b)
                rows = np.asarray(rows.as_array()).reshape(-1)
                keep = rows >= 0
                pixels = self._to_torch(images)
                jitter = np.asarray(jitter.as_array()).reshape(-1, 3)
                if not keep.all():  # the padding of the last batch
                    pixels = pixels[torch.from_numpy(keep).to(pixels.device)]
                    jitter, rows = jitter[keep], rows[keep]
                state["left"] -= 1
                yield Batch(self._finish(pixels, jitter), *self.labels_for(rows))
        finally:
            if self._open is state:
                self._close_open_epoch()

    def _close_open_epoch(self) -> None:
        state, self._open = self._open, None
        if state is not None and self._pipe is not None:
            self._end_epoch(state["dali_epoch"], state["epoch"], cancelled=state["left"] > 0)

    def _run(self, epoch: int, b: int):
        try:
            return self._pipe.run()
        except StopIteration:
            self.close_pipeline()
            raise LoaderError(f"DALI ended the epoch after {b} of {len(self)} batches") from None
        except Exception as exc:
            self.close_pipeline()
            raise self._diagnose(exc, epoch, b) from exc

    def _end_epoch(self, dali_epoch: int, epoch: int, cancelled: bool) -> None:
        """Run the pipeline to DALI's end of epoch and reset it for the next one."""
        if cancelled:  # the workers stop producing; only already prefetched batches remain
            self.plan.write(dali_epoch, epoch, False)
        try:
            for _ in range(PREFETCH + 2 if cancelled else 1):
                self._pipe.run()
            if not cancelled:
                raise LoaderError("DALI produced more batches than the epoch holds")
            self.close_pipeline()  # should not happen: start afresh
            return
        except StopIteration:
            self._pipe.reset()
            self._dali_epoch += 1
        except LoaderError:
            self.close_pipeline()
            raise
        except Exception:
            self.close_pipeline()

    def _diagnose(self, exc: BaseException, epoch: int, b: int) -> LoaderError:
        """One-line LoaderError for a failed batch: a worker's own message, else the first image of
        the batch that PIL cannot decode (naming its shard), else DALI's first line."""
        message = _worker_error(exc)
        if message is not None:
            return LoaderError(message)
        from PIL import Image

        bs = self.spec.batch_size
        rows = self.source_spec.rows(epoch)[b * bs:(b + 1) * bs]
        for row in rows[rows >= 0].tolist():
            try:
                with Image.open(io.BytesIO(self.shards.read_image_bytes(self.spec.split, row))) as image:
                    image.load()
            except LoaderError as err:
                return err
            except Exception as err:  # PIL raises many types for broken data
                tar = self.tars[int(self.source_spec.shard[row])]
                return LoaderError(f"corrupt image in {tar} ({self.spec.split} row {row}): "
                                   f"{type(err).__name__}".replace("\n", " "))
        return LoaderError(f"DALI failed on {self.spec.split} batch {b}: {_one_line(exc)}")

    def _iter_webdataset(self) -> Iterator[Batch]:
        s = self.spec
        if self._pipe is None:
            self._pipe = self._build()
            self._wds_iter = DALIGenericIterator(
                self._pipe, ["images", "position", "grade", "sample_id"], reader_name="reader",
                last_batch_policy=LastBatchPolicy.DROP if s.drop_last else LastBatchPolicy.PARTIAL,
                auto_reset=True, prepare_first_batch=False)
        dev, nb = s.device, s.device.type == "cuda"
        try:
            for b, out in enumerate(self._wds_iter):
                data = out[0]
                pixels = data["images"].to(dev, non_blocking=nb)
                rng = np.random.default_rng([s.seed, self.epoch, s.rank, b, AUGMENT_STREAM])
                strengths = np.array([0.0, 0.0, 0.0]) if s.augment is None else np.array(
                    [s.augment.brightness, s.augment.contrast, s.augment.saturation])
                jitter = rng.uniform(1 - strengths, 1 + strengths, size=(len(pixels), 3))
                yield Batch(self._finish(pixels, jitter),
                            data["position"].reshape(-1).to(dev, torch.int64, non_blocking=nb),
                            data["grade"].reshape(-1).to(dev, torch.float32, non_blocking=nb),
                            data["sample_id"].reshape(-1).to(dev, torch.int64, non_blocking=nb))
        except (LoaderError, GeneratorExit):
            raise
        except Exception as exc:
            self.close_pipeline()
            message = _worker_error(exc)
            raise LoaderError(message or f"DALI webdataset reader failed: {_one_line(exc)}") from exc

    # -- teardown -------------------------------------------------------------------------------

    def close_pipeline(self) -> None:
        """Shut the DALI pipeline and its Python workers down (a later epoch builds a new one)."""
        pipe, self._pipe, self._wds_iter, self._open = self._pipe, None, None, None
        if pipe is None:
            return
        pool = getattr(pipe, "_py_pool", None)
        try:
            pipe._shutdown()
        finally:
            if pool is not None:
                pool.close()
        self._dali_epoch = 0
        self.plan.path.write_bytes(b"\xff" * len(self.plan.path.read_bytes()))

    def close(self) -> None:
        if self._tmp is None:
            return
        try:
            self.close_pipeline()
        finally:
            self._cleanup()
            self._tmp = None


def build(shards, spec: LoaderSpec) -> DaliLoader:
    """The dali backend over a ShardSet's tar shards."""
    return DaliLoader(shards, spec)
