"""The group of each sample for leave-one-group-out cross-validation: its stage, source or any metadata
column of the manifest CSV (`origin`, `camera`, `field_id`, ...), checked against the shard set first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cornpipe.errors import ConfigError
from cornpipe.shards.fields import GROUP_FIELDS, sample_value


def group_keys(samples: Sequence[dict]) -> list[str]:
    """What these samples can be grouped by: stage, source and every metadata key any of them has."""
    return [*GROUP_FIELDS, *sorted({key for s in samples for key in s.get("meta", {})})]


def group_values(samples: Sequence[dict], key: str) -> list[Any]:
    """Each sample's value of `key`; a key no sample has, or one unknown for any sample, is refused."""
    keys = group_keys(samples)
    if key not in keys:
        raise ConfigError(f"cannot group by {key!r}: no sample has it; this shard set's group keys are "
                          f"{', '.join(keys)}")
    values = [sample_value(s, key) for s in samples]
    unknown = sum(v is None for v in values)
    if unknown:  # an "unknown" group would be a fold of whatever lacks the value, not a group
        where = ("its manifest CSV has no such column" if key in GROUP_FIELDS and unknown == len(values)
                 else "empty cells")
        raise ConfigError(f"cannot group by {key}: it is unknown for {unknown} of {len(values)} samples "
                          f"({where}); group by one of {', '.join(k for k in keys if k != key)} or use K folds")
    return values
