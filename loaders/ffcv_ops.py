"""The FFCV image decoder of the `ffcv` backend: decode, crop, resize, flip and rotate in one numba pass.

Why not FFCV's own `RandomResizedCropRGBImageDecoder` + `RandomHorizontalFlip`:

- Their random draws come from numba's per-thread generators, which nothing seeds: an epoch could
  not be replayed, and the draws would differ from every other backend's. Here the crop boxes and
  flip/rot90 flags are drawn in Python by `loaders.augment.sample_params` (the sampler every
  backend uses, seeded by (seed, epoch, rank, batch)) and handed to the decoder through one of its
  own FFCV memory buffers, written by `loaders.ffcv_loader` just before the batch runs.
- FFCV JIT-compiles every operation of every `Loader` anew (5-20 s on a 2-core machine). The work
  here lives in module-level numba functions compiled once per process and cached on disk
  (`cache=True`); the per-Loader closure FFCV compiles is a one-line call into them.
- FFCV ignores libjpeg-turbo's return code, so a damaged JPEG becomes a silent garbage image. The
  kernel records the code per sample and the loader turns a failure into a LoaderError.

Images are decoded with FFCV's libffcv (libjpeg-turbo) and resized with its OpenCV `cv::resize`
(INTER_AREA), as FFCV's decoders do. When a crop is at least twice the output size, the JPEG is
decoded at 1/2, 1/4 or 1/8 scale, as long as the crop stays >= the output (`_dct_eighths`).
Measured on a 512 px JPEG: INTER_AREA costs 0.65-1.2 ms for a non-integer downscale to 224 px (crops
of 235-376 px) but 0.05 ms for an exact 2x one, and 0.07 ms to upscale: the largest cost of this
backend at 512 px, and the reason to convert at about the training size.
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

# Columns of the per-sample parameter row (int64) the loader writes before each batch.
P_TOP, P_LEFT, P_HEIGHT, P_WIDTH, P_HFLIP, P_VFLIP, P_ROT90, P_STATUS = range(8)
PARAM_COLUMNS = 8
STATUS_OK, STATUS_BAD_JPEG, STATUS_BAD_RAW = 0, 1, 2
JPG_MODE = 0  # ffcv.fields.rgb_image.IMAGE_MODES["jpg"]

# The helpers are inlined into the batch kernels (numba IR inlining, before typing): no separate
# dispatcher per helper, whose overloads numba's parfor lowering corrupted when two kernels compiled
# the same helper (seen as a KeyError of the helper's signature).
_jit = nb.njit(nogil=True, cache=True, error_model="numpy", inline="always")

# libffcv's C entry points, bound by symbol name (not by ctypes address) so that the numba functions
# below can be cached on disk. Pointers travel as int64 (same registers on the x86-64/aarch64 ABIs).
llvm.load_library_permanently(ffcv._libffcv.__file__)
_i64, _u32 = types.int64, types.uint32
# int imdecode(uchar *src, uint64 size, uint32 h, uint32 w, uchar *dst, uint32 crop_h, uint32 crop_w,
#              uint32 off_x, uint32 off_y, uint32 scale_num, uint32 scale_denom, bool crop, bool hflip)
_imdecode = types.ExternalFunction("imdecode", types.int32(_i64, types.uint64, _u32, _u32, _i64, _u32, _u32,
                                                           _u32, _u32, _u32, _u32, types.uint8, types.uint8))
# void resize(int64 unused, uchar *src, int64 rows, int64 cols, int64 row0, int64 row1, int64 col0,
#             int64 col1, uchar *dst, int64 dst_rows, int64 dst_cols)  -- cv::resize, bilinear
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
def _place(crop, dst, hflip, vflip, k):
    """dst = rot90^k(vflip(hflip(crop))), counter-clockwise quarter turns; square (S, S, 3) arrays."""
    img = crop
    if hflip:
        img = img[:, ::-1]
    if vflip:
        img = img[::-1]
    if k == 1:
        img = img.transpose((1, 0, 2))[::-1]
    elif k == 2:
        img = img[::-1, ::-1]
    elif k == 3:
        img = img[::-1].transpose((1, 0, 2))
    dst[:] = img


@_jit
def _dct_eighths(crop_h, crop_w, size):
    """M of the M/8 scale to decode at: the smallest of 8, 4, 2, 1 for which the crop keeps `size`
    pixels on its shorter side. libjpeg-turbo then does part of the downscaling in its IDCT (faster
    than a full decode: 0.42 vs 0.72 ms for a 512 px q90 JPEG at 1/2) and the resize gets a smaller
    input. Only powers of two: its other M/8 IDCTs are slower than the full decode (1.03 ms at 5/8)."""
    side = min(crop_h, crop_w)
    m = 8
    while m > 1 and side * (m // 2) >= size * 8:
        m //= 2
    return m


@_jit
def _one(data, mode, height, width, temp, params, crop, dst):
    """Decode one stored image, crop params' box, resize it to dst's size, flip and rotate into dst."""
    n = height * width * 3
    top = min(max(params[P_TOP], 0), height - 1)
    left = min(max(params[P_LEFT], 0), width - 1)
    bottom = min(max(top + params[P_HEIGHT], top + 1), height)
    right = min(max(left + params[P_WIDTH], left + 1), width)
    rows, cols = height, width
    if mode == JPG_MODE:
        m = _dct_eighths(bottom - top, right - left, min(dst.shape[0], dst.shape[1]))
        code = _imdecode(data.ctypes.data, np.uint64(data.size), np.uint32(height), np.uint32(width),
                         temp.ctypes.data, np.uint32(height), np.uint32(width), _u32(0), _u32(0), _u32(m), _u32(8),
                         np.uint8(0), np.uint8(0))
        if code != 0:
            params[P_STATUS] = STATUS_BAD_JPEG
            dst[:] = 0
            return
        if m < 8:  # the box in the pixels of the scaled decode (TJSCALED: dims round up)
            rows, cols = (height * m + 7) // 8, (width * m + 7) // 8
            top, left = min((top * m + 4) // 8, rows - 1), min((left * m + 4) // 8, cols - 1)
            bottom = min(max((bottom * m + 4) // 8, top + 1), rows)
            right = min(max((right * m + 4) // 8, left + 1), cols)
    else:
        if data.size != n:
            params[P_STATUS] = STATUS_BAD_RAW
            dst[:] = 0
            return
        temp[:n] = data
    params[P_STATUS] = STATUS_OK
    plain = params[P_HFLIP] == 0 and params[P_VFLIP] == 0 and params[P_ROT90] == 0
    target = dst if plain else crop
    _resize(0, temp.ctypes.data, rows, cols, top, bottom, left, right,
            target.ctypes.data, target.shape[0], target.shape[1])
    if not plain:
        _place(crop, dst, params[P_HFLIP] != 0, params[P_VFLIP] != 0, params[P_ROT90])


def _batch_os(batch_indices, dst, temp, crop, params, metadata, mmap, ptrs, sizes):
    for i in nb.prange(len(batch_indices)):
        field = metadata[batch_indices[i]]
        data = _read_os(field["data_ptr"], mmap, ptrs, sizes)
        _one(data, field["mode"], np.int64(field["height"]), np.int64(field["width"]), temp[i], params[i],
             crop[i], dst[i])
    return dst[:len(batch_indices)]


def _batch_process(batch_indices, dst, temp, crop, params, metadata, pages, ptrs, sizes, page_to_slot,
                   page_shift):
    for i in nb.prange(len(batch_indices)):
        field = metadata[batch_indices[i]]
        data = _read_process(field["data_ptr"], pages, ptrs, sizes, page_to_slot, page_shift)
        _one(data, field["mode"], np.int64(field["height"]), np.int64(field["width"]), temp[i], params[i],
             crop[i], dst[i])
    return dst[:len(batch_indices)]


# Parallel builds only: FFCV's epoch thread sets numba's thread count to the loader's `workers`
# (numba.set_num_threads, per calling thread), so workers=1 runs them on one thread.
_KERNELS: dict[bool, Callable] = {
    os_cache: nb.njit(nogil=True, cache=True, error_model="numpy", parallel=True)(fn)
    for os_cache, fn in ((True, _batch_os), (False, _batch_process))
}


class ParamCropDecoder(Operation):
    """FFCV decoder for RGBImageField: (B, S, S, 3) uint8 crops whose boxes and flips come from a buffer.

    Its memory is (output, decode scratch, crop scratch, params); `params` (B, PARAM_COLUMNS) int64
    is filled by the loader for each batch slot (see loaders.ffcv_loader) and the kernel writes each
    sample's decode status back into it.
    """

    PARAMS_BUFFER = 3  # index of the params buffer in this operation's memory tuple

    def __init__(self, size: int, *, os_cache: bool, page_size: int) -> None:
        super().__init__()
        self.size = int(size)
        self.os_cache = bool(os_cache)
        self.page_shift = int(np.log2(page_size))

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, ...]]:
        widths, heights = self.metadata["width"], self.metadata["height"]
        biggest = int(widths.max()) * int(heights.max()) * 3 if len(widths) else 3
        out = (self.size, self.size, 3)
        u8 = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=out, dtype=u8),
                (AllocationQuery(out, u8), AllocationQuery((biggest,), u8), AllocationQuery(out, u8),
                 AllocationQuery((PARAM_COLUMNS,), np.dtype("<i8"))))

    def generate_code(self) -> Callable:
        kernel = _KERNELS[self.os_cache]
        if self.os_cache:
            def decode(batch_indices, memory, metadata, storage_state):
                dst, temp, crop, params = memory
                mmap, ptrs, sizes = storage_state
                return kernel(batch_indices, dst, temp, crop, params, metadata, mmap, ptrs, sizes)
        else:
            shift = np.uint64(self.page_shift)

            def decode(batch_indices, memory, metadata, storage_state):
                dst, temp, crop, params = memory
                pages, ptrs, sizes, page_to_slot = storage_state
                return kernel(batch_indices, dst, temp, crop, params, metadata, pages, ptrs, sizes,
                              page_to_slot, shift)
        return decode
