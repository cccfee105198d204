"""The oversampling cell of each loader row: its values of the `--oversample-by` keys, as int codes.

Keys (LoaderSpec.oversample_by, position always among them): `position` and `grade` (the labels), `stage`
and `source` (where the manifest gives them) and any metadata column of the manifest CSV (`origin`,
`camera`, `field_id`, ...). loaders.sampling balances the cells (position x origin: field photos of each
position as often as lab ones); the draw sees int codes only, so the FFCV and DALI paths stay numeric.

A sample without a value for a key (an empty CSV cell, a source the manifest does not give) is in that
key's "unknown" cell, a cell like any other: unlabelled photos are neither dropped nor merged into a group.
A code is the value's index among the key's sorted distinct values over the loader's rows; only which rows
share a cell matters to the draw, so every backend, given the same rows, draws the same epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cornpipe.errors import LoaderError
from cornpipe.shards.fields import GROUP_FIELDS, sample_value

LABEL_KEYS: tuple[str, ...] = ("position", "grade")
UNKNOWN = "unknown"  # the value of a sample that has none for a key


def valid_keys(samples: Sequence[dict]) -> list[str]:
    """What a shard set's draw can balance over: the labels, stage and source where any sample has one,
    and every metadata column."""
    known = [k for k in GROUP_FIELDS if any(sample_value(s, k) is not None for s in samples)]
    return [*LABEL_KEYS, *known, *sorted({key for s in samples for key in s.get("meta", {})})]


def check_keys(keys: Sequence[str], samples: Sequence[dict]) -> None:
    """LoaderError naming the shard set's valid keys when a key is not one of them."""
    valid = valid_keys(samples)
    unknown = [k for k in keys if k not in valid]
    if unknown:
        raise LoaderError(f"cannot oversample by {', '.join(unknown)}: this shard set's keys are "
                          f"{', '.join(valid)}")


def cell_codes(keys: Sequence[str], samples: Sequence[dict], grade: np.ndarray) -> np.ndarray | None:
    """int64 (N, K) codes of the keys other than position for the rows' manifest `samples` (and their
    `grade` labels), None when position is the only key (the draw's position-only path)."""
    others = [k for k in keys if k != "position"]
    if not others:
        return None
    columns = []
    for key in others:
        if key == "grade":
            values = np.asarray(grade, dtype=np.float64).reshape(-1)
        else:
            values = np.array([UNKNOWN if (v := sample_value(s, key)) is None or str(v).strip() == "" else str(v)
                               for s in samples], dtype=str)
        columns.append(np.unique(values, return_inverse=True)[1].reshape(-1))
    return np.stack(columns, axis=1).astype(np.int64)
