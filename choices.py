"""The names a run's settings choose from, and their defaults: the ground floor every part and the CLI import.

Nothing here imports torch, so the CLI builds its options and `--help` from these names without waiting
seconds for torch; the modules that own the machinery (`cornpipe.loaders.base`, `cornpipe.models.heads`)
import them from here, so each name and default is written once.
"""

from __future__ import annotations

BACKENDS: tuple[str, ...] = ("ffcv", "dali", "torch", "resident")  # loaders.base.BACKEND_MODULES builds each
DEFAULT_IMAGE_SIZE = 224  # px, side of the square images a loader yields and the model sees
MIN_IMAGE_SIZE = 8  # px: the one lower bound, checked by the run config and by every loader request
OVERSAMPLE_STRATEGIES: tuple[str, ...] = ("none", "balanced", "sqrt", "joint")
DEFAULT_OVERSAMPLE = "balanced"  # a training run's draw of train rows (rare position classes come up as often)
GRADE_HEADS: tuple[str, ...] = ("regression", "corn")
SEED_MAX = 2**63 - 1  # the largest seed torch takes (int64); numpy takes no negative one: every --seed is 0..this
LOGGERS: tuple[str, ...] = ("none", "tensorboard")  # `train --log`: per-epoch scalars for an experiment tracker
