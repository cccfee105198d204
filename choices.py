"""The names a run's settings choose from, and their defaults: the ground floor every part and the CLI import.

Nothing here imports torch, so the CLI builds its options and `--help` from these names without waiting
seconds for torch; the modules that own the machinery (`cornpipe.loaders.base`, `cornpipe.models.heads`)
import them from here, so each name and default is written once.
"""

from __future__ import annotations

from collections.abc import Sequence

BACKENDS: tuple[str, ...] = ("ffcv", "dali", "torch", "resident")  # loaders.base.BACKEND_MODULES builds each
DEFAULT_IMAGE_SIZE = 224  # px, side of the square images a loader yields and the model sees
MIN_IMAGE_SIZE = 8  # px: the one lower bound, checked by the run config and by every loader request
OVERSAMPLE_STRATEGIES: tuple[str, ...] = ("none", "balanced", "sqrt", "joint")
DEFAULT_OVERSAMPLE = "balanced"  # a training run's draw of train rows (rare position classes come up as often)
# the keys whose cells the draw balances (loaders.cells): position, plus grade, stage, source or metadata columns
DEFAULT_OVERSAMPLE_BY: tuple[str, ...] = ("position",)
GRADE_HEADS: tuple[str, ...] = ("regression", "corn")
SEED_MAX = 2**63 - 1  # the largest seed torch takes (int64); numpy takes no negative one: every --seed is 0..this
LOGGERS: tuple[str, ...] = ("none", "tensorboard")  # `train --log`: per-epoch scalars for an experiment tracker


def oversample_keys(value: str | Sequence[str]) -> tuple[str, ...]:
    """`--oversample-by` ("position,origin" or a list) as a tuple without repeats, in the order given;
    ValueError when a name is empty or position is missing (the draw always balances the position task)."""
    parts = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    keys = tuple(dict.fromkeys(p.strip() for p in parts))
    if not keys or "" in keys or "position" not in keys:
        text = value if isinstance(value, str) else ",".join(parts)
        raise ValueError(f"oversample_by must be position plus any of grade, stage, source or a metadata column, "
                         f"comma-separated, e.g. position,origin (got {text!r})")
    return keys
