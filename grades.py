"""The grade scale: cornpipe's default and the one rule every part checks a scale with.

A dataset declares its scale (the scale is data, not code): shards/ checks it on the way in (convert,
synth), models/ on the way out (heads, losses, metrics), both with `check_grade_scale`. It sits on the
ground floor beside errors.py because models/ may not import shards/.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real

from cornpipe.errors import CornpipeError

DEFAULT_GRADE_SCALE: tuple[int, ...] = (0, 3, 5, 7, 9)  # the team's current survey scale (0 = healthy)


def _shown(values: list) -> str:
    return ",".join(f"{float(v):g}" if isinstance(v, Real) else repr(v) for v in values)


def check_grade_scale(values: Iterable[float], *, error: type[CornpipeError] = CornpipeError,
                      shown: str | None = None) -> tuple[float, ...]:
    """The scale as floats, or `error` naming why it is none: a grade scale has at least two grades, each a
    finite number >= 0, each once, in ascending order. `shown`: how the user wrote it (for the message)."""
    scale = list(values)
    shown = _shown(scale) if shown is None else shown
    if len(scale) < 2:
        raise error(f"grade scale {shown!r} needs at least two grades")
    for value in scale:
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise error(f"grade scale {shown!r}: {value!r} is not a finite number")
    negative = [v for v in scale if v < 0]
    if negative:
        raise error(f"grade scale {shown!r}: grade {negative[0]:g} is negative")
    repeated = [v for i, v in enumerate(scale) if v in scale[:i]]
    if repeated:
        raise error(f"grade scale {shown!r}: grade {repeated[0]:g} appears twice")
    if scale != sorted(scale):
        raise error(f"grade scale {shown!r} must be in ascending order")
    return tuple(float(v) for v in scale)
