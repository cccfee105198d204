"""`ffcv` backend: FFCV `Loader`s over the shard set's .beton files, with the shared epoch draw and augmentation.

Pipeline of one batch (FFCV's EpochIterator thread, then the consuming thread):

    rows    = loaders.sampling draw for (seed, epoch, rank)      -> FFCV traversal order (EpochOrder)
    params  = loaders.pixels.params.sample_params per batch             -> the decoder's params buffer
    decode  = libjpeg-turbo decode + crop box + cv::resize + flips + rot90 (loaders.backends.ffcv_ops, numba, CPU)
    CPU, float32: colour jitter + normalise in the same pass,     (B, 3, S, S) float32 (NHWC in memory
        written into the batch's own tensor                        when channels_last); done
    CPU, host-only: the uint8 crops, into the batch's own tensor  (B, S, S, 3) uint8; done
    otherwise: ToTensor -> ToDevice(non_blocking) on CUDA        (B, S, S, 3) uint8 on the device
        loaders.pixels.finish on the device: -> float (channels_last on CUDA), colour jitter, normalise, dtype

Rows from any split: a loader reads its split's .beton, or, for `LoaderSpec.sample_ids` (cross-
validation folds), whichever .beton files hold those ids, through one FFCV Loader widened over all of
them (loaders.backends.ffcv_files). The epoch draw runs over the loader's own rows as on every other backend.
Batch composition: the files leave no trace in it. A batch is the draw's next `batch_size` rows,
train.beton and val.beton rows mixed as the draw orders them (not one split per batch, no extra
partial batch per file), so oversampling counts, rank slices, drop_last and `len()` are those of the
torch, resident and dali backends, and a fold reads the same ids in the same order on all four.

Labels are not decoded by FFCV: the loader knows each batch's rows (FFCV processes the traversal
order in order), so position/grade/sample_id come from the manifest arrays, which are checked
against each .beton's own label columns when the loader is built.

FFCV specifics handled here:
- ffcv 1.0.2 refuses `Loader(order=<TraversalOrder subclass>)` (it tests `isinstance` on the class and
  then calls the instance), so the Loader is built with SEQUENTIAL and `loader.traversal_order` is
  replaced by an `EpochOrder` afterwards; the epoch comes from `set_epoch`, not FFCV's counter.
- FFCV ignores the numba/decode errors of its worker thread (the consumer would wait forever); the
  epoch runner here hands them to the consumer, which raises a one-line LoaderError.
- A damaged .beton (truncated, or rows pointing past its end) would crash the process through the
  memory map (SIGBUS), so the file is checked before an FFCV Loader touches it.
- Building FFCV Loaders is costly (its operations are JIT-compiled per Loader), so Loaders are
  cached per (files, image size, workers, device, cache mode, output) and reused.
- FFCV reuses its output buffers a few batches later; a batch handed out must not change under its
  holder, so normalised batches are written into arrays of a `loaders.pixels.memory.OutputPool`, each reused
  only once no tensor made from it is alive (a fresh array per batch costs its page faults every batch,
  docs/loaders.md). For the same reason a CPU loader keeps FFCV's
  batch-slot buffers from one epoch to the next (`_allocate_offered`) instead of FFCV's new ones.
- FFCV sets torch's intra-op thread count (to 1 on import, to `workers` while an epoch runs); it is
  restored after each epoch and on close.
- FFCV's epoch thread uses CUDA streams whenever a GPU exists (even for a CPU loader), on the current
  CUDA device: on a multi-GPU machine, `torch.cuda.set_device` to the loader's device first.
Options: `os_cache` (default True: the OS page cache holds the .beton; False: FFCV's process cache);
`fuse` (default True: finish CPU batches inside the decoder; False: always uint8 + loaders.pixels.finish).
Augmentation draws replay with the epoch (same (seed, epoch) -> same pixels), as on torch/resident.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from queue import Full

import numpy as np
import torch

from cornpipe.errors import LoaderError, MissingDependency, install_hint
from cornpipe.loaders.base import HOST_DTYPE, Batch
from cornpipe.loaders.common import (
    EpochLoader,
    LoaderSpec,
    augment_params,
    cut_to_batches,
    row_cells,
    source_rows,
)
from cornpipe.loaders.pixels.finish import Finisher
from cornpipe.loaders.pixels.memory import OutputPool
from cornpipe.shards import fields as F

_threads = torch.get_num_threads()  # importing FFCV sets torch's intra-op threads to 1; undone below
try:
    import numba
    from ffcv.loader import Loader, OrderOption
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import ToDevice, ToTensor
    from ffcv.traversal_order.base import TraversalOrder

    from cornpipe.loaders.backends import ffcv_ops as ops
    from cornpipe.loaders.backends.ffcv_files import BetonSet, one_line
except ImportError as exc:  # pragma: no cover - exercised by the missing-library test
    raise MissingDependency(f"the ffcv backend needs FFCV ({exc.name} is missing): {install_hint('ffcv')}") from exc
finally:
    torch.set_num_threads(_threads)


BATCHES_AHEAD = 3  # FFCV's default: batches prepared ahead of the consumer
_CACHE_SIZE = 4  # FFCV Loaders kept alive for reuse (each holds a memory map of its .beton files)
_cache: OrderedDict[tuple, Loader] = OrderedDict()
_cache_lock = threading.Lock()


class EpochOrder(TraversalOrder):
    """FFCV traversal order that returns `draw(epoch)`: loaders.sampling's rows for this rank (as the
    Loader's virtual indices, loaders.backends.ffcv_files)."""

    def __init__(self, loader: Loader, draw: Callable[[int], np.ndarray]) -> None:
        super().__init__(loader)
        self.draw = draw

    def sample_order(self, epoch: int) -> np.ndarray:
        return np.ascontiguousarray(self.draw(epoch), dtype=np.int64)


class _Slots:
    """Stands in for FFCV's per-slot output buffer: every slot is this batch's own array."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __getitem__(self, slot: int) -> np.ndarray:
        return self.array


_offered = threading.local()  # FFCV batch-slot buffers an FfcvLoader hands its next epoch (FfcvLoader._spare)


def _allocate_offered(allocate: Callable) -> Callable:
    """A Loader's graph.allocate_memory that returns the calling thread's offered buffers when they
    fit. FFCV allocates every epoch's slot buffers (decode scratch, crops, outputs) afresh, and their
    pages are faulted in again each epoch, which counts when an epoch is no longer than the slots
    (5 batches), as in the team's 62-image first run (docs/loaders.md)."""

    def allocate_memory(batch_size: int, slots: int):
        offer = getattr(_offered, "memory", None)
        if offer is not None and offer[0] == (batch_size, slots):
            return offer[1]
        return allocate(batch_size, slots)

    return allocate_memory


class _EpochRun(EpochIterator):
    """FFCV's epoch thread, plus: each batch's augmentation params go into the decoder's buffer
    before it runs, finished batches go into arrays of `pool`, and a failure reaches the consumer
    instead of killing the thread silently."""

    def __init__(self, loader: Loader, order: np.ndarray, params: list[np.ndarray], node_id: int,
                 pool: OutputPool | None) -> None:
        self._params = params  # per batch: (B, PARAM_COLUMNS) int64
        self._node_id = node_id
        self._pool = pool
        self.failure: BaseException | None = None
        super().__init__(loader, order)  # starts the thread

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        memory = self.memory_allocations["operation"]
        own = memory[self._node_id]
        params = own[ops.ParamCropDecoder.PARAMS_BUFFER][batch_slot][:len(batch_indices)]
        params[:] = self._params[b_ix]
        if self._pool is not None:
            buffers = list(own)
            buffers[ops.ParamCropDecoder.OUTPUT_BUFFER] = _Slots(self._pool.take())
            memory[self._node_id] = tuple(buffers)
        try:
            result = super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)
        finally:
            memory[self._node_id] = own
        bad = np.flatnonzero(params[:, ops.P_STATUS] != ops.STATUS_OK)
        if bad.size:
            raise _BadRow(int(batch_indices[bad[0]]), int(params[bad[0], ops.P_STATUS]))
        return result

    def run(self) -> None:
        # The images of a batch go to numba's threads one at a time (thread-local: this epoch thread's
        # kernels only) rather than in equal halves decided up front: a crop that INTER_AREA shrinks
        # costs several times one it enlarges, so one thread finished its half early and waited
        # (A/B in docs/loaders.md).
        numba.set_parallel_chunksize(1)
        try:
            super().run()
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
            self.failure = exc
            while not self.terminate_event.is_set():
                try:
                    self.output_queue.put(None, timeout=0.5)
                    break
                except Full:
                    continue


class _BadRow(Exception):
    def __init__(self, index: int, status: int) -> None:
        super().__init__(index, status)
        self.index, self.status = index, status  # index: the Loader's virtual index


def _clamp_workers(workers: int) -> int:
    # numba refuses more threads than NUMBA_NUM_THREADS (the core count by default).
    return max(1, min(int(workers), int(numba.config.NUMBA_NUM_THREADS)))


def _layout(spec: LoaderSpec) -> int:
    """The decoder's output: on the CPU, the batch itself -- jittered and normalised float32, or
    host-only uint8 crops -- in an array of the loader's; otherwise (CUDA, float16, `fuse=False`)
    uint8 crops in FFCV's buffer for loaders.pixels.finish."""
    if spec.on_cuda or not spec.options.get("fuse", True):
        return ops.U8
    if spec.dtype == HOST_DTYPE:
        return ops.HOST
    if spec.dtype == torch.float32:
        return ops.NHWC if spec.channels_last else ops.PLANAR
    return ops.U8


def _ffcv_loader(betons: BetonSet, spec: LoaderSpec, workers: int, os_cache: bool, layout: int) -> Loader:
    """A (cached) FFCV Loader decoding the files' images with ParamCropDecoder; other fields disabled."""
    norm = spec.normalization if layout != ops.U8 else None
    # Not the batch size: FFCV reads it only when an epoch starts (set per epoch in FfcvLoader).
    key = (betons.key(), spec.image_size, workers, os_cache, str(spec.device), layout,
           None if norm is None else (tuple(norm.mean), tuple(norm.std)))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    reader = betons.readers[0]
    decoder = ops.ParamCropDecoder(spec.image_size, os_cache=os_cache, page_size=int(reader.page_size),
                                   biggest=betons.biggest, layout=layout,
                                   **({} if norm is None else {"mean": norm.mean, "std": norm.std}))
    transforms = [ToTensor()]
    if spec.on_cuda:
        transforms.append(ToDevice(spec.device, non_blocking=True))
    pipelines = {name: None for name in reader.field_names}
    pipelines[F.IMAGE] = PipelineSpec(F.IMAGE, decoder=decoder, transforms=transforms)
    try:
        loader = Loader(str(betons.paths[0]), batch_size=spec.batch_size, num_workers=workers, os_cache=os_cache,
                        order=OrderOption.SEQUENTIAL, pipelines=pipelines, drop_last=False,
                        batches_ahead=BATCHES_AHEAD, seed=spec.seed)
    except Exception as exc:
        raise LoaderError(f"FFCV cannot open {betons.paths[0]}: {one_line(exc)}") from exc
    betons.widen(loader, os_cache)
    loader.graph.allocate_memory = _allocate_offered(loader.graph.allocate_memory)
    loader.cornpipe_decoder_node = loader.graph.operation_to_node[decoder][0].id
    loader.cornpipe_output_shape = decoder.output_shape()
    loader.cornpipe_output_dtype = decoder.output_dtype
    with _cache_lock:
        _cache[key] = loader
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return loader


class FfcvLoader(EpochLoader):
    """The split's .beton (or the files holding `spec.sample_ids`) through FFCV; yields `Batch`es on `spec.device`."""

    def __init__(self, shards, spec: LoaderSpec) -> None:
        locations, position, grade, sample_id = source_rows(shards, spec)  # a split, or any sample ids
        super().__init__(spec, position, grade, sample_id, row_cells(shards, spec, locations, grade))
        self.betons = BetonSet.open(shards, locations, spec.split)
        self.path = self.betons.paths[0]
        self.sizes = self.betons.sizes  # (N, 2) stored height, width of each row
        self.workers = _clamp_workers(spec.workers)
        os_cache = bool(spec.options.get("os_cache", True))
        self.layout = _layout(spec)
        self._torch_threads = torch.get_num_threads()  # restored after FFCV changes it
        try:
            self._loader: Loader | None = _ffcv_loader(self.betons, spec, self.workers, os_cache, self.layout)
        finally:
            torch.set_num_threads(self._torch_threads)
        self._pool = None
        if self.layout != ops.U8:  # batches in flight: the queue, FFCV's slots, the consumer's
            self._pool = OutputPool((spec.batch_size, *self._loader.cornpipe_output_shape), BATCHES_AHEAD + 4,
                                     self._loader.cornpipe_output_dtype)
        self._run: _EpochRun | None = None
        # ((batch_size, slots), buffers) of the last epoch whose thread is done; CPU only: on CUDA the
        # slots' device buffers may still be read by the previous epoch's queued finishing kernels
        self._spare: tuple | None = None
        self._finish = Finisher(spec.device, spec.dtype, jitter=spec.augment is not None,
                                channels_last=spec.channels_last, norm=spec.normalization)

    def _params(self, epoch: int, batches: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per batch: the decoder's int64 param rows (the jitter factors in them too) and the (B, 3)
        colour jitter factors (for loaders.pixels.finish)."""
        s = self.spec
        rows_out, jitter_out = [], []
        for b, rows in enumerate(batches):
            p = augment_params(s, self.sizes[rows], epoch, b)
            out = np.zeros((len(rows), ops.PARAM_COLUMNS), dtype=np.int64)
            out[:, :4] = np.rint(p.boxes)  # top, left, height, width
            out[:, ops.P_HFLIP], out[:, ops.P_VFLIP], out[:, ops.P_ROT90] = p.hflip, p.vflip, p.rot90
            out[:, ops.P_FILE] = self.betons.file_of[rows]
            out[:, ops.P_JITTER:ops.P_JITTER + 3] = np.asarray(p.jitter, dtype=np.float64).view(np.int64)
            rows_out.append(out)
            jitter_out.append(p.jitter)
        return rows_out, jitter_out

    def __iter__(self) -> Iterator[Batch]:
        if self._loader is None:
            raise LoaderError("this ffcv loader is closed")
        loader, epoch, bs = self._loader, self.epoch, self.spec.batch_size
        virtual = self.betons.virtual
        loader.traversal_order = EpochOrder(loader, lambda e: virtual[self.indices(e)])
        rows = cut_to_batches(self.indices(epoch), self.spec)
        batches = [rows[i:i + bs] for i in range(0, len(rows), bs)]
        if not batches:
            return
        params, jitter = self._params(epoch, batches)
        order = loader.first_traversal_order = virtual[rows]  # == traversal_order.sample_order(epoch), cut
        loader.batch_size = bs  # the cached Loader may have been built for another batch size
        _offered.memory, self._spare = self._spare, None
        try:
            run = self._run = _EpochRun(loader, order, params, loader.cornpipe_decoder_node, self._pool)
        finally:
            _offered.memory = None
        finished = False
        try:
            for b, (pixels, *_rest) in enumerate(run):
                if self.layout == ops.U8:
                    images = self._finish(pixels, jitter[b])
                else:  # finished by the decoder, in an array of its own
                    images = pixels if self.layout in (ops.PLANAR, ops.HOST) else pixels.permute(0, 3, 1, 2)
                yield Batch(images, *self.labels_for(batches[b]))
            if run.failure is not None:
                raise self._explain(run.failure)
            finished = True
        finally:
            run.close()
            if self._run is run:
                self._run = None
            if finished and not self.spec.on_cuda:  # the thread has sent its last batch and is ending
                run.join(timeout=0.1)
                if not run.is_alive():
                    self._spare = ((bs, BATCHES_AHEAD + 2), run.memory_allocations)
            torch.set_num_threads(self._torch_threads)

    def _explain(self, failure: BaseException) -> LoaderError:
        if isinstance(failure, _BadRow):
            path, split, row = self.betons.locate(failure.index)
            what = "a JPEG that does not decode" if failure.status == ops.STATUS_BAD_JPEG else "bad raw pixels"
            return LoaderError(f"{path} is damaged: {split} row {row} holds {what}")
        return LoaderError(f"FFCV failed reading {', '.join(map(str, self.betons.paths))}: {one_line(failure)}")

    def close(self) -> None:
        if self._run is not None:
            self._run.close()
            self._run = None
        self._loader = None  # the FFCV Loader itself stays in the module cache for the next loader
        self._pool = self._spare = None
        torch.set_num_threads(self._torch_threads)


def build(shards, spec: LoaderSpec) -> FfcvLoader:
    """The ffcv backend over a ShardSet's .beton files."""
    return FfcvLoader(shards, spec)
