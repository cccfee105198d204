"""The names a run's settings choose from, importable without torch: the CLI builds its options and
`--help` from them, and `cornpipe --help` must not wait seconds for torch, sklearn and matplotlib.

They mirror the registries that own them, `cornpipe.loaders.base` (BACKENDS, DEFAULT_IMAGE_SIZE,
OVERSAMPLE_STRATEGIES) and `cornpipe.models.heads` (GRADE_HEADS), which import torch;
tests/cli/test_cli_startup.py fails when the two disagree.
"""

from __future__ import annotations

BACKENDS: tuple[str, ...] = ("ffcv", "dali", "torch", "resident")
DEFAULT_IMAGE_SIZE = 224  # px, side of the square images a loader yields and the model sees
OVERSAMPLE_STRATEGIES: tuple[str, ...] = ("none", "balanced", "sqrt", "joint")
GRADE_HEADS: tuple[str, ...] = ("regression", "corn")
