"""Inputs with identical bytes, and the check that every input is accounted for.

Identical bytes are one photo filed twice. When the copies agree on position and grade, the first
(by path) is kept and the others are rejected as its duplicates. When they disagree, nobody can tell
which label is right, and keeping any one of them would train on a label that may be wrong: all are
rejected, each with the same reason naming every copy and its label, and `cornpipe inspect` lists them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cornpipe.errors import ConvertError
from cornpipe.shards.discover import Candidate, Rejection, conflicting_labels_reason


def resolve_duplicates(decoded: Sequence[tuple[Candidate, Any]]) -> tuple[list, list[Rejection]]:
    """Split (candidate, prepared) pairs, in input order, into those kept and the rejections.

    `prepared` needs a `sha256` (of the input file's bytes). Kept pairs keep the input order.
    """
    copies: dict[str, list[Candidate]] = {}
    for cand, prep in decoded:
        copies.setdefault(prep.sha256, []).append(cand)
    kept, rejected = [], []
    for cand, prep in decoded:
        group = copies[prep.sha256]
        if len({(c.position, c.grade) for c in group}) > 1:
            rejected.append(Rejection(cand.rel, conflicting_labels_reason([(c.rel, c.position, c.grade)
                                                                            for c in group])))
        elif cand is not group[0]:
            rejected.append(Rejection(cand.rel, f"duplicate of {group[0].rel} (same bytes)"))
        else:
            kept.append((cand, prep))
    return kept, rejected


def check_accounting(*, found: int, converted: int, rejected: int) -> None:
    """Every input found is converted or rejected: a real check (`python -O` drops an assert)."""
    if converted + rejected != found:
        raise ConvertError(f"internal error: {converted} converted + {rejected} rejected != {found} found; "
                           "an input was lost or counted twice (please report this)")
