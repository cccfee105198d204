"""`ffcv` backend: an FFCV `Loader` over the split's .beton, with the shared epoch draw and augmentation.

Pipeline of one batch (FFCV's EpochIterator thread, then the consuming thread):

    rows    = loaders.sampling draw for (seed, epoch, rank)      -> FFCV traversal order (EpochOrder)
    params  = loaders.augment.sample_params per batch             -> the decoder's params buffer
    decode  = libjpeg-turbo decode + crop box + cv::resize + flips + rot90 (loaders.ffcv_ops, numba, CPU)
    ToTensor -> ToDevice(non_blocking) on CUDA                   (B, S, S, 3) uint8 on the device
    loaders.finish on the device: -> float32 (channels_last on CUDA), colour jitter, normalise, dtype

Labels are not decoded by FFCV: the loader knows each batch's rows (FFCV processes the traversal
order in order), so position/grade/sample_id come from the manifest arrays, which are checked
against the .beton's own label columns when the loader is built.

FFCV specifics handled here:
- ffcv 1.0.2 refuses `Loader(order=<TraversalOrder subclass>)` (it tests `isinstance` on the class and
  then calls the instance), so the Loader is built with SEQUENTIAL and `loader.traversal_order` is
  replaced by an `EpochOrder` afterwards; the epoch comes from `set_epoch`, not FFCV's counter.
- FFCV ignores the numba/decode errors of its worker thread (the consumer would wait forever); the
  epoch runner here hands them to the consumer, which raises a one-line LoaderError.
- A damaged .beton (truncated, or rows pointing past its end) would crash the process through the
  memory map (SIGBUS), so the file is checked before an FFCV Loader touches it.
- Building FFCV Loaders is costly (its operations are JIT-compiled per Loader), so Loaders are
  cached per (file, image size, workers, device, cache mode) and reused.
- FFCV sets torch's intra-op thread count (to 1 on import, to `workers` while an epoch runs); it is
  restored after each epoch and on close.
- FFCV's epoch thread uses CUDA streams whenever a GPU exists (even for a CPU loader), on the current
  CUDA device: on a multi-GPU machine, `torch.cuda.set_device` to the loader's device first.
Options: `os_cache` (default True: the OS page cache holds the .beton; False: FFCV's process cache).
Augmentation draws replay with the epoch (same (seed, epoch) -> same pixels), as on torch/resident.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from queue import Full

import numpy as np
import torch

from cornpipe.errors import LoaderError, MissingDependency, install_hint
from cornpipe.loaders.base import Batch
from cornpipe.loaders.common import EpochLoader, LoaderSpec, augment_params, cut_to_batches
from cornpipe.loaders.finish import Finisher
from cornpipe.shards import fields as F

_threads = torch.get_num_threads()  # importing FFCV sets torch's intra-op threads to 1; undone below
try:
    import numba
    from ffcv.loader import Loader, OrderOption
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline import PipelineSpec
    from ffcv.reader import Reader
    from ffcv.transforms import ToDevice, ToTensor
    from ffcv.traversal_order.base import TraversalOrder

    from cornpipe.loaders import ffcv_ops as ops
except ImportError as exc:  # pragma: no cover - exercised by the missing-library test
    raise MissingDependency(f"the ffcv backend needs FFCV ({exc.name} is missing): {install_hint('ffcv')}") from exc
finally:
    torch.set_num_threads(_threads)

BATCHES_AHEAD = 3  # FFCV's default: batches prepared ahead of the consumer
_CACHE_SIZE = 4  # FFCV Loaders kept alive for reuse (each holds a memory map of its .beton)
_cache: OrderedDict[tuple, Loader] = OrderedDict()
_cache_lock = threading.Lock()


class EpochOrder(TraversalOrder):
    """FFCV traversal order that returns `draw(epoch)`: loaders.sampling's rows for this rank."""

    def __init__(self, loader: Loader, draw: Callable[[int], np.ndarray]) -> None:
        super().__init__(loader)
        self.draw = draw

    def sample_order(self, epoch: int) -> np.ndarray:
        return np.ascontiguousarray(self.draw(epoch), dtype=np.int64)


class _EpochRun(EpochIterator):
    """FFCV's epoch thread, plus: each batch's augmentation params go into the decoder's buffer
    before it runs, and a failure reaches the consumer instead of killing the thread silently."""

    def __init__(self, loader: Loader, order: np.ndarray, params: list[np.ndarray], node_id: int) -> None:
        self._params = params  # per batch: (B, PARAM_COLUMNS) int64
        self._node_id = node_id
        self.failure: BaseException | None = None
        super().__init__(loader, order)  # starts the thread

    def run_pipeline(self, b_ix, batch_indices, batch_slot, cuda_event):
        buffer = self.memory_allocations["operation"][self._node_id][ops.ParamCropDecoder.PARAMS_BUFFER]
        params = buffer[batch_slot][:len(batch_indices)]
        params[:] = self._params[b_ix]
        result = super().run_pipeline(b_ix, batch_indices, batch_slot, cuda_event)
        bad = np.flatnonzero(params[:, ops.P_STATUS] != ops.STATUS_OK)
        if bad.size:
            raise _BadRow(int(batch_indices[bad[0]]), int(params[bad[0], ops.P_STATUS]))
        return result

    def run(self) -> None:
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
    def __init__(self, row: int, status: int) -> None:
        super().__init__(row, status)
        self.row, self.status = row, status


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _clamp_workers(workers: int) -> int:
    # numba refuses more threads than NUMBA_NUM_THREADS (the core count by default).
    return max(1, min(int(workers), int(numba.config.NUMBA_NUM_THREADS)))


def check_beton(path: Path, count: int, labels: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Reader:
    """Open `path` with FFCV's Reader and check it is whole and holds the manifest's rows, so that a
    damaged file is a one-line LoaderError rather than a crash inside the memory map."""
    if not path.is_file():
        raise LoaderError(f"{path} is missing (rerun cornpipe convert)")
    try:
        reader = Reader(str(path))
        size = path.stat().st_size
        fields = list(reader.field_names)
        meta = reader.metadata
        table = reader.alloc_table
        if len(meta) != int(reader.num_samples) or len(table) == 0:
            raise ValueError("metadata or allocation table cut short")
        ends = table["ptr"].astype(np.uint64) + table["size"].astype(np.uint64)
        if int(ends.max()) > size:
            raise ValueError("allocation table points past the end of the file")
        image = meta[f"f{fields.index(F.IMAGE)}"]
        if not np.isin(image["data_ptr"], table["ptr"]).all():
            raise ValueError("image pointers outside the allocation table")
    except LoaderError:
        raise
    except Exception as exc:  # numpy/ffcv raise assorted errors for a damaged file
        raise LoaderError(f"{path} is truncated or corrupt ({_one_line(exc)}); rerun cornpipe convert") from exc
    if int(reader.num_samples) != count:
        raise LoaderError(f"{path} holds {int(reader.num_samples)} rows but manifest.json lists {count}")
    position, grade, sample_id = labels
    for name, want in ((F.SAMPLE_ID, sample_id), (F.POSITION, position), (F.GRADE, grade)):
        if name in fields:
            got = np.asarray(meta[f"f{fields.index(name)}"])
            if not np.allclose(got.astype(np.float64), want.astype(np.float64), atol=1e-4):
                raise LoaderError(f"{path} does not match manifest.json (column {name} differs)")
    return reader


def _ffcv_loader(path: Path, reader: Reader, spec: LoaderSpec, workers: int, os_cache: bool) -> Loader:
    """A (cached) FFCV Loader decoding `path`'s images with ParamCropDecoder; other fields disabled."""
    st = path.stat()
    # Not the batch size: FFCV reads it only when an epoch starts (set per epoch in FfcvLoader).
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, spec.image_size, workers, os_cache,
           str(spec.device))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    decoder = ops.ParamCropDecoder(spec.image_size, os_cache=os_cache, page_size=int(reader.page_size))
    transforms = [ToTensor()]
    if spec.on_cuda:
        transforms.append(ToDevice(spec.device, non_blocking=True))
    pipelines = {name: None for name in reader.field_names}
    pipelines[F.IMAGE] = PipelineSpec(F.IMAGE, decoder=decoder, transforms=transforms)
    try:
        loader = Loader(str(path), batch_size=spec.batch_size, num_workers=workers, os_cache=os_cache,
                        order=OrderOption.SEQUENTIAL, pipelines=pipelines, drop_last=False,
                        batches_ahead=BATCHES_AHEAD, seed=spec.seed)
    except Exception as exc:
        raise LoaderError(f"FFCV cannot open {path}: {_one_line(exc)}") from exc
    loader.cornpipe_decoder_node = loader.graph.operation_to_node[decoder][0].id
    with _cache_lock:
        _cache[key] = loader
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return loader


class FfcvLoader(EpochLoader):
    """The split's .beton through FFCV; yields `Batch`es on `spec.device`."""

    def __init__(self, shards, spec: LoaderSpec) -> None:
        labels = shards.labels(spec.split)
        super().__init__(spec, *labels)
        self.path = Path(shards.beton_path(spec.split))
        reader = check_beton(self.path, shards.count(spec.split), labels)
        image = reader.metadata[f"f{list(reader.field_names).index(F.IMAGE)}"]
        self.sizes = np.stack([image["height"], image["width"]], axis=1).astype(np.int64)  # (N, 2)
        self.workers = _clamp_workers(spec.workers)
        os_cache = bool(spec.options.get("os_cache", True))
        self._torch_threads = torch.get_num_threads()  # restored after FFCV changes it
        try:
            self._loader: Loader | None = _ffcv_loader(self.path, reader, spec, self.workers, os_cache)
        finally:
            torch.set_num_threads(self._torch_threads)
        self._run: _EpochRun | None = None
        self._finish = Finisher(spec.device, spec.dtype, jitter=spec.augment is not None,
                                channels_last=spec.channels_last, norm=spec.normalization)

    def _params(self, epoch: int, batches: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per batch: the decoder's int64 param rows and the (B, 3) colour jitter factors."""
        s = self.spec
        rows_out, jitter_out = [], []
        for b, rows in enumerate(batches):
            p = augment_params(s, self.sizes[rows], epoch, b)
            out = np.zeros((len(rows), ops.PARAM_COLUMNS), dtype=np.int64)
            out[:, :4] = np.rint(p.boxes)  # top, left, height, width
            out[:, ops.P_HFLIP], out[:, ops.P_VFLIP], out[:, ops.P_ROT90] = p.hflip, p.vflip, p.rot90
            rows_out.append(out)
            jitter_out.append(p.jitter)
        return rows_out, jitter_out

    def __iter__(self) -> Iterator[Batch]:
        if self._loader is None:
            raise LoaderError("this ffcv loader is closed")
        loader, epoch, bs = self._loader, self.epoch, self.spec.batch_size
        loader.traversal_order = EpochOrder(loader, self.indices)
        loader.next_epoch = epoch
        order = loader.next_traversal_order()
        loader.first_traversal_order = order
        order = cut_to_batches(order, self.spec)
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        if not batches:
            return
        params, jitter = self._params(epoch, batches)
        loader.batch_size = bs  # the cached Loader may have been built for another batch size
        run = self._run = _EpochRun(loader, order, params, loader.cornpipe_decoder_node)
        try:
            for b, (pixels, *_rest) in enumerate(run):
                yield Batch(self._finish(pixels, jitter[b]), *self.labels_for(batches[b]))
            if run.failure is not None:
                raise self._explain(run.failure)
        finally:
            run.close()
            if self._run is run:
                self._run = None
            torch.set_num_threads(self._torch_threads)

    def _explain(self, failure: BaseException) -> LoaderError:
        if isinstance(failure, _BadRow):
            what = "a JPEG that does not decode" if failure.status == ops.STATUS_BAD_JPEG else "bad raw pixels"
            return LoaderError(f"{self.path} is damaged: {self.spec.split} row {failure.row} holds {what}")
        return LoaderError(f"FFCV failed reading {self.path}: {_one_line(failure)}")

    def close(self) -> None:
        if self._run is not None:
            self._run.close()
            self._run = None
        self._loader = None  # the FFCV Loader itself stays in the module cache for the next loader
        torch.set_num_threads(self._torch_threads)


def build(shards, spec: LoaderSpec) -> FfcvLoader:
    """The ffcv backend over a ShardSet's .beton."""
    return FfcvLoader(shards, spec)
