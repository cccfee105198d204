"""The FFCV image decoder of the `ffcv` backend: decode, crop, resize, flip, rotate (and normalise) in one numba pass.

Why not FFCV's own `RandomResizedCropRGBImageDecoder` + `RandomHorizontalFlip` + `NormalizeImage`:

- Their random draws come from numba's per-thread generators, which nothing seeds: an epoch could
  not be replayed, and the draws would differ from every other backend's. Here the crop boxes and
  flip/rot90 flags are drawn in Python by `loaders.pixels.params.sample_params` (the sampler every
  backend uses, seeded by (seed, epoch, rank, batch)) and handed to the decoder through one of its
  own FFCV memory buffers, written by `loaders.backends.ffcv_loader` just before the batch runs.
- FFCV JIT-compiles every operation of every `Loader` anew (seconds per Loader on 2 cores). The work
  here lives in module-level numba functions compiled once per process and cached on disk
  (`cache=True`); the per-Loader closure FFCV compiles is a short call into them.
- FFCV ignores libjpeg-turbo's return code, so a damaged JPEG becomes a silent garbage image. The
  kernel records the code per sample and the loader turns a failure into a LoaderError.
- One decoder reads several .beton files (a cross-validation fold spans train.beton and val.beton):
  the storage state is a tuple with one FFCV state per file and each sample's params row names its
  file (`loaders.backends.ffcv_files`).

Outputs (`layout`):
- U8: (B, S, S, 3) uint8 crops in FFCV's buffer, finished by `loaders.pixels.finish` (CUDA batches, and the
  `fuse=False` reference path).
- PLANAR / NHWC (a CPU float32 batch): each crop is colour-jittered (by the factors in its params
  row) and normalised while it is still in the core's cache, and written as float32 straight into the
  batch's own array, NCHW or NHWC (channels_last), the flips folded into that pass
  (loaders.pixels.pixel_kernels): no flipped copy of every image (FFCV's RandomHorizontalFlip) and no
  second pass; the fused CPU finish runs the same per-image passes but needs the uint8 batch written
  and read once more, on the consuming thread (per-pass timings: docs/loaders.md).
- HOST (host-only CPU batches, `loaders.base.HOST_DTYPE`): the U8 crops, written into the batch's
  own array rather than FFCV's buffer, which loaders.pixels.finish would have to copy out.

Images are decoded with FFCV's libffcv (libjpeg-turbo) and resized with its OpenCV `cv::resize`
(INTER_AREA), as FFCV's decoders do. When a crop is at least twice the output size, the JPEG is
decoded at 1/2, 1/4 or 1/8 scale, as long as the crop stays >= the output (`_dct_eighths`).
INTER_AREA's non-integer downscales are this backend's largest cost at 512 px (docs/loaders.md):
the reason to convert at about the training size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import ffcv._libffcv
import llvmlite.binding as llvm
import numba as nb
import numpy as np
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba import types

from cornpipe.loaders.pixels import pixel_kernels as px

# Columns of the per-sample parameter row (int64) the loader writes before each batch; the last
# three hold the colour jitter factors (brightness, contrast, saturation) as float64 bit patterns.
P_TOP, P_LEFT, P_HEIGHT, P_WIDTH, P_HFLIP, P_VFLIP, P_ROT90, P_FILE, P_STATUS, P_JITTER = range(10)
PARAM_COLUMNS = P_JITTER + 3
STATUS_OK, STATUS_BAD_JPEG, STATUS_BAD_RAW = 0, 1, 2
JPG_MODE = 0  # ffcv.fields.rgb_image.IMAGE_MODES["jpg"]
# decoder outputs: uint8 (B, S, S, 3) crops in FFCV's buffer; normalised float32 (B, 3, S, S) and
# (B, S, S, 3); uint8 (B, S, S, 3) crops in the loader's array. All but U8 go into the loader's array.
U8, PLANAR, NHWC, HOST = 0, 1, 2, 3

_jit = px.jit  # inlined into the batch kernels (see loaders.pixels.pixel_kernels)

# libffcv's C entry points, bound by symbol name (not by ctypes address) so that the numba functions
# below can be cached on disk. Pointers travel as int64 (same registers on the x86-64/aarch64 ABIs).
llvm.load_library_permanently(ffcv._libffcv.__file__)
_i64, _u32 = types.int64, types.uint32
# int imdecode(uchar *src, uint64 size, uint32 h, uint32 w, uchar *dst, uint32 crop_h, uint32 crop_w,
#              uint32 off_x, uint32 off_y, uint32 scale_num, uint32 scale_denom, bool crop, bool hflip)
_imdecode = types.ExternalFunction("imdecode", types.int32(_i64, types.uint64, _u32, _u32, _i64, _u32, _u32,
                                                           _u32, _u32, _u32, _u32, types.uint8, types.uint8))
# void resize(int64 unused, uchar *src, int64 rows, int64 cols, int64 row0, int64 row1, int64 col0,
#             int64 col1, uchar *dst, int64 dst_rows, int64 dst_cols)  -- cv::resize, INTER_AREA
_resize = types.ExternalFunction("resize", types.void(*([_i64] * 11)))


@_jit
def _read_os(address, mmap, ptrs, sizes):
    """One stored sample's bytes from an OS-cache (mmap) state, as ffcv's OSCacheManager reads them."""
    size = sizes[np.searchsorted(ptrs, address)]
    return mmap[address:address + size]


@_jit
def _read_process(address, pages, ptrs, sizes, page_to_slot, page_shift):
    """The same from a process-cache state (pages loaded by ffcv's ProcessCacheManager)."""
    size = sizes[np.searchsorted(ptrs, address)]
    page = address >> page_shift
    offset = address - (page << page_shift)
    return pages[page_to_slot[page], offset:offset + size]


@_jit
def _dct_eighths(crop_h, crop_w, size):
    """M of the M/8 scale to decode at: the smallest of 8, 4, 2, 1 for which the crop keeps `size`
    pixels on its shorter side. libjpeg-turbo then does part of the downscaling in its IDCT (faster
    than a full decode) and the resize gets a smaller input. Only powers of two: its other M/8 IDCTs
    are slower than the full decode (docs/loaders.md)."""
    side = min(crop_h, crop_w)
    m = 8
    while m > 1 and side * (m // 2) >= size * 8:
        m //= 2
    return m


@_jit
def _crop_resize(data, mode, height, width, temp, params, target):
    """Decode one stored image, crop params' box and resize it into target (S, S, 3) uint8; False
    (params' status set, target zeroed) when the stored bytes are bad."""
    n = height * width * 3
    top = min(max(params[P_TOP], 0), height - 1)
    left = min(max(params[P_LEFT], 0), width - 1)
    bottom = min(max(top + params[P_HEIGHT], top + 1), height)
    right = min(max(left + params[P_WIDTH], left + 1), width)
    rows, cols = height, width
    if mode == JPG_MODE:
        m = _dct_eighths(bottom - top, right - left, min(target.shape[0], target.shape[1]))
        code = _imdecode(data.ctypes.data, np.uint64(data.size), np.uint32(height), np.uint32(width),
                         temp.ctypes.data, np.uint32(height), np.uint32(width), _u32(0), _u32(0), _u32(m), _u32(8),
                         np.uint8(0), np.uint8(0))
        if code != 0:
            params[P_STATUS] = STATUS_BAD_JPEG
            target[:] = 0
            return False
        if m < 8:  # the box in the pixels of the scaled decode (TJSCALED: dims round up)
            rows, cols = (height * m + 7) // 8, (width * m + 7) // 8
            top, left = min((top * m + 4) // 8, rows - 1), min((left * m + 4) // 8, cols - 1)
            bottom = min(max((bottom * m + 4) // 8, top + 1), rows)
            right = min(max((right * m + 4) // 8, left + 1), cols)
    else:
        if data.size != n:
            params[P_STATUS] = STATUS_BAD_RAW
            target[:] = 0
            return False
        temp[:n] = data
    params[P_STATUS] = STATUS_OK
    _resize(0, temp.ctypes.data, rows, cols, top, bottom, left, right,
            target.ctypes.data, target.shape[0], target.shape[1])
    return True


@_jit
def _one_u8(data, mode, height, width, temp, params, crop, dst):
    """One image as its (S, S, 3) uint8 crop, flipped and turned, into dst."""
    hflip, vflip, k = params[P_HFLIP] != 0, params[P_VFLIP] != 0, params[P_ROT90] % 4
    plain = not hflip and not vflip and k == 0
    if not _crop_resize(data, mode, height, width, temp, params, dst if plain else crop):
        dst[:] = 0
    elif not plain:
        px.place(crop, dst, hflip, vflip, k)


@_jit
def _one_float(data, mode, height, width, temp, params, crop, spare, dst, mean, inv_std, planar):
    """One image jittered and normalised into dst, float32 (3, S, S) when `planar`, else (S, S, 3)."""
    hflip, vflip, k = params[P_HFLIP] != 0, params[P_VFLIP] != 0, params[P_ROT90] % 4
    if not _crop_resize(data, mode, height, width, temp, params, crop):
        dst[:] = 0
        return
    src = crop
    if k != 0:  # rare (AugmentConfig.rot90): turned in uint8 first
        px.place(crop, spare, hflip, vflip, k)
        src, hflip, vflip = spare, False, False
    factors = params[P_JITTER:P_JITTER + 3].view(np.float64).astype(np.float32)
    if factors[0] == 1 and factors[1] == 1 and factors[2] == 1:
        px.normalise(src, dst, hflip, vflip, mean, inv_std, planar)
    else:
        px.jitter_normalise(src, dst, hflip, vflip, factors, mean, inv_std, planar)


@_jit
def _one(data, field, temp, params, crop, out_u8, out_float, mean, inv_std, layout):
    height, width = np.int64(field["height"]), np.int64(field["width"])
    if layout == U8 or layout == HOST:
        _one_u8(data, field["mode"], height, width, temp, params, crop[0], out_u8)
    else:
        _one_float(data, field["mode"], height, width, temp, params, crop[0], crop[1], out_float, mean, inv_std,
                   layout == PLANAR)


def _batch_os(batch_indices, out_u8, out_float, temp, crop, params, metadata, mmap, ptrs, sizes, file, mean,
              inv_std, layout):
    """The images of `file` in this batch (the others are another call's); one of out_u8 / out_float
    is the batch's output (by `layout`), the other a placeholder."""
    for i in nb.prange(len(batch_indices)):
        if params[i, P_FILE] == file:
            field = metadata[batch_indices[i]]
            data = _read_os(field["data_ptr"], mmap, ptrs, sizes)
            u8, at = layout == U8 or layout == HOST, np.int64(i)  # (the prange index is unsigned: unified with 0 it would be float)
            _one(data, field, temp[i], params[i], crop[i], out_u8[at if u8 else 0],
                 out_float[0 if u8 else at], mean, inv_std, layout)


def _batch_process(batch_indices, out_u8, out_float, temp, crop, params, metadata, pages, ptrs, sizes,
                   page_to_slot, page_shift, file, mean, inv_std, layout):
    for i in nb.prange(len(batch_indices)):
        if params[i, P_FILE] == file:
            field = metadata[batch_indices[i]]
            data = _read_process(field["data_ptr"], pages, ptrs, sizes, page_to_slot, page_shift)
            u8, at = layout == U8 or layout == HOST, np.int64(i)  # (the prange index is unsigned: unified with 0 it would be float)
            _one(data, field, temp[i], params[i], crop[i], out_u8[at if u8 else 0],
                 out_float[0 if u8 else at], mean, inv_std, layout)


# Parallel builds only: FFCV's epoch thread sets numba's thread count to the loader's `workers`
# (numba.set_num_threads, per calling thread), so workers=1 runs them on one thread. fastmath lets
# the float loops of loaders.pixels.pixel_kernels vectorise (their inputs are uint8: no NaN or infinity).
# px.fresh_cache: their cache also goes stale when loaders.pixels.pixel_kernels (inlined here) changes.
_batch_os = px.fresh_cache(nb.njit(nogil=True, cache=True, error_model="numpy", fastmath=True,
                                   parallel=True)(_batch_os))
_batch_process = px.fresh_cache(nb.njit(nogil=True, cache=True, error_model="numpy", fastmath=True,
                                        parallel=True)(_batch_process))


@nb.njit(nogil=True, cache=True)
def _files_os(batch_indices, out_u8, out_float, temp, crop, params, metadata, states, mean, inv_std, layout,
              page_shift):
    """A batch over OS-cache states: one (mmap, ptrs, sizes) per file (loaders.backends.ffcv_files); page_shift unused."""
    for f in range(len(states)):
        mmap, ptrs, sizes = states[f]
        _batch_os(batch_indices, out_u8, out_float, temp, crop, params, metadata, mmap, ptrs, sizes, f, mean,
                  inv_std, layout)


@nb.njit(nogil=True, cache=True)
def _files_process(batch_indices, out_u8, out_float, temp, crop, params, metadata, states, mean, inv_std,
                   layout, page_shift):
    """A batch over process-cache states: one (pages, ptrs, sizes, page_to_slot) per file."""
    for f in range(len(states)):
        pages, ptrs, sizes, page_to_slot = states[f]
        _batch_process(batch_indices, out_u8, out_float, temp, crop, params, metadata, pages, ptrs, sizes,
                       page_to_slot, page_shift, f, mean, inv_std, layout)


class ParamCropDecoder(Operation):
    """FFCV decoder for RGBImageField whose crop boxes, flips and colour jitter come from a buffer.

    Its memory is (output, decode scratch, crop scratch, params); `params`
    (B, PARAM_COLUMNS) int64 is filled by the loader for each batch slot (see loaders.backends.ffcv_loader)
    and the kernel writes each sample's decode status back into it. `layout` U8: the output is
    FFCV's (B, S, S, 3) uint8 buffer. PLANAR / NHWC: jittered, normalised float32 (`mean`, `std` in
    0-255 units); HOST: uint8 crops; these are written into an array the loader puts in the output's
    place for each batch (its buffer here is a placeholder: the batch leaves the loader, and FFCV
    would overwrite its own buffer a few batches later).
    `biggest`: bytes of the largest decoded image of every file the loader reads.
    """

    PARAMS_BUFFER = 3  # index of the params buffer in this operation's memory tuple
    OUTPUT_BUFFER = 0

    def __init__(self, size: int, *, os_cache: bool, page_size: int, biggest: int, layout: int = U8,
                 mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
                 std: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        self.size = int(size)
        self.os_cache = bool(os_cache)
        self.page_shift = int(np.log2(page_size))
        self.biggest = int(biggest)
        self.layout = int(layout)
        # the arithmetic of loaders.pixels.finish_cpu: float32 (x - mean) * float32(1 / std)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.inv_std = (1.0 / np.asarray(std, dtype=np.float64)).astype(np.float32)

    @property
    def output_dtype(self) -> np.dtype:
        return np.dtype("<u1") if self.layout in (U8, HOST) else np.dtype("<f4")

    def output_shape(self) -> tuple[int, int, int]:
        s = self.size
        return (3, s, s) if self.layout == PLANAR else (s, s, 3)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        s, u8 = self.size, np.dtype("<u1")
        state = replace(previous_state, jit_mode=True, shape=self.output_shape(), dtype=self.output_dtype)
        if self.layout == U8:
            out = AllocationQuery((s, s, 3), u8)
        else:
            out = AllocationQuery((1,), self.output_dtype)  # placeholder, see the class doc
        spares = 2 if self.layout in (PLANAR, NHWC) else 1  # float: a second crop for rot90
        return state, (out, AllocationQuery((self.biggest,), u8), AllocationQuery((spares, s, s, 3), u8),
                       AllocationQuery((PARAM_COLUMNS,), np.dtype("<i8")))

    def generate_code(self) -> Callable:
        # FFCV compiles this closure per Loader: a call into the cached module-level functions
        files = _files_os if self.os_cache else _files_process
        mean, inv_std, layout, shift = self.mean, self.inv_std, self.layout, np.uint64(self.page_shift)
        if layout in (U8, HOST):
            def decode(batch_indices, memory, metadata, storage_state):
                out, temp, crop, params = memory  # out: FFCV's buffer (U8), the loader's array (HOST)
                files(batch_indices, out, np.empty((1, 1, 1, 1), np.float32), temp, crop, params, metadata,
                      storage_state, mean, inv_std, layout, shift)
                return out
        else:
            def decode(batch_indices, memory, metadata, storage_state):
                out, temp, crop, params = memory  # out: the loader's (B, *output_shape()) float32 array
                files(batch_indices, np.empty((1, 1, 1, 3), np.uint8), out, temp, crop, params, metadata,
                      storage_state, mean, inv_std, layout, shift)
                return out
        return decode
