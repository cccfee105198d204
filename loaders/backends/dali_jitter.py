"""The finish step (colour jitter + normalisation) of the `dali` backend's CPU batches, inside DALI's operator threads.

The kernel is the per-image form of the CPU finish every backend runs (`loaders.pixels.finish_cpu`):
`loaders.pixels.pixel_kernels.jitter_normalise`, which reads the (S, S, 3) uint8 crop as it is and
writes the (3, S, S) float32 image, compiled with fastmath (its loops vectorise) and without numba's
own threads, and called per image by DALI's `NumbaFunction` operator: DALI's threads run the images
in parallel, beside decoding, as crop_mirror_normalize does without jitter. Copying each crop into
planes for the batch kernel first, or finishing on the main thread (torch's uint8 HWC->CHW copy,
numba's threads contending with DALI's), cost more (docs/loaders.md); this costs about what
crop_mirror_normalize does.

Compiling takes a few seconds, once per process (the operator is kept and reused by every
pipeline). Where numba or DALI's numba plugin does not work, `jitter_op` is None and the loader
finishes in torch (loaders.pixels.finish), as on CUDA.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np

from cornpipe.loaders.pixels import finish_cpu


@functools.cache
def jitter_op(mean: tuple[float, ...], std: tuple[float, ...]) -> Any | None:
    """A DALI operator: (crop (S, S, 3) uint8, factors (3,) float32) -> jittered, (x - mean) / std
    (3, S, S) float32 per image; None where numba cannot run it."""
    if not finish_cpu.ready():
        return None
    try:
        import numba
        from nvidia.dali import types
        from nvidia.dali.plugin.numba import NumbaFunction

        from cornpipe.loaders.pixels.pixel_kernels import jitter_normalise

        def finish_one(crop, out, factors, mean, inv_std):  # pragma: no cover - compiled by numba
            """crop (S, S, 3) uint8 (DALI flipped it already) -> out (3, S, S) float32."""
            jitter_normalise(crop, out, False, False, factors, mean, inv_std, True)

        # serial: one image per call, DALI's threads are the parallelism
        kernel = numba.njit(nogil=True, fastmath=True, error_model="numpy")(finish_one)
        m = np.asarray(mean, dtype=np.float32)
        inv_std = (1.0 / np.asarray(std, dtype=np.float64)).astype(np.float32)

        def run(out, crop, factors):  # pragma: no cover - compiled by numba
            kernel(crop, out, factors, m, inv_std)

        def setup(outs, ins):  # pragma: no cover - compiled by numba; (S, S, 3) in -> (3, S, S) out
            for i in range(len(outs[0])):
                outs[0][i][0] = 3
                outs[0][i][1] = ins[0][i][0]
                outs[0][i][2] = ins[0][i][1]

        return NumbaFunction(run_fn=run, setup_fn=setup, out_types=[types.FLOAT],
                             in_types=[types.UINT8, types.FLOAT], outs_ndim=[3], ins_ndim=[3, 1])
    except Exception as exc:  # an unsupported numba for DALI's plugin, a failed compile
        warnings.warn(f"DALI cannot run the colour jitter ({type(exc).__name__}: {exc}); the dali backend "
                      f"finishes CPU batches in torch", RuntimeWarning, stacklevel=2)
        return None
