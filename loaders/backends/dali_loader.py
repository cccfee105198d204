"""`dali` backend: a DALI pipeline over the split's tar shards.

Two ways to feed the pipeline (`options={"reader": ...}`):

- "external" (default, every strategy): a parallel `fn.external_source` in batch mode
  (loaders.backends.dali_source) reads each batch's JPEGs by random access through the shards' DALI index, for
  exactly the rows `loaders.sampling` draws for (seed, epoch, rank) -- the same epochs as every other
  backend, oversampling included -- with the shared augmentation draw of each batch (that of the ffcv
  and resident backends; replayable with the epoch).
- "webdataset" (oversample "none" only): DALI's own `fn.readers.webdataset` over tar + .idx, with
  DALI's random operators for the augmentation. Each sample once per epoch (reader padding +
  partial last batch), ranks read disjoint fixed shards (`stick_to_shard`), but the order is the
  reader's shuffle buffer, not the shared draw, and epochs cannot be replayed: a throughput mode.

Graph: ROI decode of the crop (`device="mixed"`, nvJPEG, on CUDA; libjpeg-turbo on CPU): external,
`decoders.image_slice` of the integer window around the drawn box; webdataset, DALI's
`decoders.image_random_crop` -> resize to (S, S) with antialiasing (external: the exact box inside
the window; a flip is a reversed ROI edge) -> rot90 (`fn.rotate`, nearest, only when enabled) ->
the finish, in DALI's threads: without colour jitter `crop_mirror_normalize` writes the batch
contract's images (dtype, CHW or NHWC-in-memory, mean/std), handed to torch without a copy; with
jitter on CPU, the fused numba kernel every CPU backend finishes with (loaders.backends.dali_jitter), so every
backend shares one definition of the jitter. Torch finishes DALI's uint8 crops instead (loaders.pixels.finish)
for jitter on CUDA (batched tensor ops there), host-only uint8 batches and dtypes DALI does not write.

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
from cornpipe.loaders.backends.dali_jitter import jitter_op
from cornpipe.loaders.backends.dali_source import (
    EpochPlan,
    EpochSource,
    SourceSpec,
    row_locations,
    worker_error,
)
from cornpipe.loaders.base import Batch
from cornpipe.loaders.common import AUGMENT_STREAM, EpochLoader, LoaderSpec, row_cells, source_rows
from cornpipe.loaders.pixels.finish import Finisher
from cornpipe.shards import fields as F

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
# the image dtypes DALI's crop_mirror_normalize writes (others are finished in torch)
NORMALIZED_TYPES: dict[torch.dtype, types.DALIDataType] = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}
_TORCH_TYPES = {types.UINT8: torch.uint8, types.FLOAT: torch.float32, types.FLOAT16: torch.float16}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((ln.strip() for ln in text if ln.strip() and "Traceback" not in ln), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class DaliLoader(EpochLoader):
    """The split's tar shards through a DALI pipeline; yields `Batch`es on `spec.device`."""

    def __init__(self, shards, spec: LoaderSpec) -> None:
        locations, position, grade, sample_id = source_rows(shards, spec)  # a split, or any sample ids
        super().__init__(spec, position, grade, sample_id, row_cells(shards, spec, locations, grade))
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
        self.tars, shard, offset, size, hw = row_locations(shards, locations)
        self.workers = max(1, int(spec.workers))
        self.start_method: str | None = spec.options.get("py_start_method")  # None: decided at build
        self._tmp = Path(tempfile.mkdtemp(prefix="cornpipe-dali-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._tmp), True)
        self.plan = EpochPlan(self._tmp / "plan.bin")
        self.source_spec = SourceSpec(loader=spec, tars=self.tars, shard=shard, offset=offset, size=size, hw=hw,
                                      position=self.position, grade=self.grade, plan=str(self.plan.path),
                                      cells=self.cells)
        self._pipe: Pipeline | None = None
        self._wds_iter: DALIGenericIterator | None = None
        self._dali_epoch = 0  # DALI's own epoch counter (one per pipeline reset)
        self._open: dict | None = None  # the epoch being iterated: dali_epoch, epoch, batches left
        # Who finishes the crops (colour jitter, mean/std, dtype, layout): DALI's threads, with
        # crop_mirror_normalize ("normalize", no jitter) or the shared fused jitter kernel ("jitter", CPU;
        # decided at build, when it compiles), else torch (loaders.pixels.finish): jitter on CUDA (batched tensor
        # ops there), host-only uint8 batches, dtypes DALI does not write.
        jitters, floating = self.source_spec.jitters, spec.dtype.is_floating_point
        self.finish_in = ("normalize" if spec.dtype in NORMALIZED_TYPES and not jitters else
                          "jitter" if jitters and floating and not spec.on_cuda else "torch")
        self._jitter_op = None
        self._finish = Finisher(spec.device, spec.dtype, jitter=jitters, channels_last=spec.channels_last,
                                norm=spec.normalization)

    # -- the DALI graph ------------------------------------------------------------------------

    def _shared_geometry(self, jpeg, anchor, shape, roi_start, roi_end, angle=None, jitter=None):
        """External source: the shared augmentation draws. Only the integer window around the crop box
        is decoded (libjpeg-turbo / nvJPEG ROI decoding), then the box is resized to (S, S) with
        antialiasing (its reversed edges flip it), turned, and finished with the drawn jitter factors."""
        s = self.spec
        images = fn.decoders.image_slice(jpeg, anchor, shape, device="mixed" if s.on_cuda else "cpu",
                                         output_type=types.RGB)  # int32 (x, y) anchor, (w, h) shape: pixels
        images = fn.resize(images, size=[s.image_size] * 2, roi_start=roi_start, roi_end=roi_end,
                           roi_relative=False, antialias=True)
        if angle is not None:
            images = fn.rotate(images, angle=angle, keep_size=True, interp_type=types.INTERP_NN)
        return self._finish_graph(images, factors=jitter)

    def _own_geometry(self, jpeg):
        """webdataset reader: DALI's own random operators (its random crop decodes only the crop)."""
        s = self.spec
        device, size = "mixed" if s.on_cuda else "cpu", [s.image_size] * 2
        aug = s.augment
        if aug is None:
            images = fn.decoders.image(jpeg, device=device, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=s.image_size / s.val_crop_fraction, antialias=True)
            return self._finish_graph(fn.crop(images, crop=size))
        images = fn.decoders.image_random_crop(jpeg, device=device, output_type=types.RGB,
                                               random_area=list(aug.scale), random_aspect_ratio=list(aug.ratio))
        images = fn.resize(images, size=size, antialias=True)
        if aug.vflip:
            images = fn.flip(images, horizontal=0, vertical=fn.random.coin_flip())
        if aug.rot90:
            angle = fn.random.uniform(values=[0.0, 90.0, 180.0, 270.0])
            images = fn.rotate(images, angle=angle, keep_size=True, interp_type=types.INTERP_NN)
        factors = None
        if self.finish_in == "jitter":  # DALI's own draw, as for the geometry
            factors = fn.stack(*(fn.random.uniform(range=[-1.0, 1.0]) * v + 1.0
                                 for v in (aug.brightness, aug.contrast, aug.saturation)))
        return self._finish_graph(images, fn.random.coin_flip() if aug.hflip else 0, factors)

    def _finish_graph(self, images, mirror=0, factors=None):
        """The last steps in DALI (see finish_in): (x - mean) / std to the contract's dtype and layout
        (CHW, or HWC for channels_last, handed to torch as an NHWC-strided NCHW view); or jitter with
        `factors` ((3,) per image) and normalise to float32 CHW; else the uint8 crops for torch."""
        s = self.spec
        if self.finish_in == "normalize":
            return fn.crop_mirror_normalize(images, mirror=mirror, mean=list(s.normalization.mean),
                                            std=list(s.normalization.std), dtype=NORMALIZED_TYPES[s.dtype],
                                            output_layout="HWC" if s.channels_last else "CHW")
        if self.planar:
            return fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.UINT8, output_layout="CHW")
        images = images if isinstance(mirror, int) else fn.flip(images, horizontal=mirror)
        return self._jitter_op(images, factors) if self.finish_in == "jitter" else images

    @property
    def planar(self) -> bool:
        """Whether DALI hands torch planar (3, S, S) uint8 crops: for the fused CPU finish, which reads
        planes (DALI's transpose costs far less than torch's uint8 permute-copy)."""
        s = self.spec
        return self.finish_in == "torch" and s.dtype.is_floating_point and not s.on_cuda

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
        if self.finish_in == "jitter":
            self._jitter_op = jitter_op(s.normalization.mean, s.normalization.std)  # compiles once per process
            if self._jitter_op is None:
                self.finish_in = "torch"
        with pipe:
            if self.reader == "external":
                src = self.source_spec
                extra = int(src.rotates) + int(src.jitters)
                jpeg, row, anchor, shape, roi_start, roi_end, *more = fn.external_source(
                    source=EpochSource(src), num_outputs=6 + extra, parallel=True, batch=True,
                    batch_info=True, prefetch_queue_depth=PREFETCH,
                    dtype=[types.UINT8, types.INT64, types.INT32, types.INT32] + [types.FLOAT] * (2 + extra))
                angle = more.pop(0) if src.rotates else None
                jitter = more[0] if more else None  # (3,) factors per image, when jittering
                images = self._shared_geometry(jpeg, anchor, shape, roi_start, roi_end, angle, jitter)
                pipe.set_outputs(images, row, *([jitter] if jitter is not None and self.finish_in == "torch" else []))
            else:
                jpeg, position, grade, sample_id = fn.readers.webdataset(
                    paths=self.tars, index_paths=[str(i) for _, i in self.shards.shards(s.split)],
                    ext=[F.TAR_IMAGE_EXT, F.TAR_POSITION_EXT, F.TAR_GRADE_EXT, F.TAR_ID_EXT],
                    dtypes=[types.UINT8, types.INT64, types.FLOAT, types.INT64], name="reader",
                    random_shuffle=s.shuffle, initial_fill=min(1024, max(1, self.rows)), seed=s.seed + s.rank,
                    shard_id=s.rank, num_shards=s.world_size, stick_to_shard=True, pad_last_batch=True,
                    missing_component_behavior="error")
                pipe.set_outputs(self._own_geometry(jpeg), position, grade, sample_id)
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
        """DALI's batch -> a torch tensor on the device, as DALI's own torch iterator does it: zero-copy
        DLPack (stream-ordered, keeps DALI's buffer alive) under DALI's dynamic executor, else a copy
        on torch's current stream."""
        tensor = images.as_tensor()
        dev = self.spec.device
        if self._pipe.exec_dynamic:
            if self.spec.on_cuda:
                with torch.cuda.device(dev):
                    return torch.from_dlpack(tensor)
            return torch.from_dlpack(tensor)
        out = torch.empty(tensor.shape(), dtype=_TORCH_TYPES[tensor.dtype], device=dev)
        stream = torch.cuda.current_stream(dev) if self.spec.on_cuda else None
        return feed_ndarray(tensor, out, cuda_stream=stream)

    def _images(self, pixels: torch.Tensor, jitter: np.ndarray | None) -> torch.Tensor:
        """The batch contract's images from DALI's output: normalised there, or finished here."""
        s = self.spec
        if self.finish_in == "normalize":
            return pixels.permute(0, 3, 1, 2) if s.channels_last else pixels  # (B, 3, S, S)
        if self.finish_in == "jitter":  # (B, 3, S, S) float32, as the Finisher's fused pass leaves it
            x = pixels if s.dtype == torch.float32 else pixels.to(s.dtype)
            return x.contiguous(memory_format=torch.channels_last) if s.channels_last else x
        # the Finisher takes (B, S, S, 3) crops of any strides: planar ones as an HWC view
        return self._finish(pixels.permute(0, 2, 3, 1) if self.planar else pixels, jitter)

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
                images, rows, *jitter = self._run(epoch, b)
                rows = np.asarray(rows.as_array()).reshape(-1)
                factors = np.asarray(jitter[0].as_array()).reshape(-1, 3) if jitter else None
                state["left"] -= 1
                yield Batch(self._images(self._to_torch(images), factors), *self.labels_for(rows))
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
        message = worker_error(exc)
        if message is not None:
            return LoaderError(message)
        from PIL import Image

        bs = self.spec.batch_size
        for row in self.source_spec.rows(epoch)[b * bs:(b + 1) * bs].tolist():
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
                jitter = None
                if self.source_spec.jitters and self.finish_in == "torch":
                    rng = np.random.default_rng([s.seed, self.epoch, s.rank, b, AUGMENT_STREAM])
                    strengths = np.array([s.augment.brightness, s.augment.contrast, s.augment.saturation])
                    jitter = rng.uniform(1 - strengths, 1 + strengths, size=(len(pixels), 3))
                yield Batch(self._images(pixels, jitter),
                            data["position"].reshape(-1).to(dev, torch.int64, non_blocking=nb),
                            data["grade"].reshape(-1).to(dev, torch.float32, non_blocking=nb),
                            data["sample_id"].reshape(-1).to(dev, torch.int64, non_blocking=nb))
        except (LoaderError, GeneratorExit):
            raise
        except Exception as exc:
            self.close_pipeline()
            message = worker_error(exc)
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
