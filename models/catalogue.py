"""Parameter counts for `cornpipe models`: built on the meta device, so no memory or time is spent on weights."""

from __future__ import annotations

import torch

from cornpipe.grades import DEFAULT_GRADE_SCALE
from cornpipe.models import create_model

_SCALE = DEFAULT_GRADE_SCALE


def count_parameters(name: str, num_positions: int = 3) -> int:
    """Parameters of model `name` with cornpipe's two heads (3 positions, regression grade head)."""
    with torch.device("meta"):
        model = create_model(name, num_positions=num_positions, grade_scale=_SCALE)
    return sum(p.numel() for p in model.parameters())
