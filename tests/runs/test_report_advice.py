"""report.md's advice holds for the run it describes: "restore the best checkpoint" only when the best epoch
is not the last one (it was printed for a run whose best epoch was its last)."""

from __future__ import annotations

from typing import Any

import pytest

from cornpipe.runs.report import assess


def _records(best_epoch: int) -> list[dict[str, Any]]:
    """Four epochs: train loss falls throughout, validation loss rises for the last two (overfitting)."""
    train = [1.0, 0.8, 0.6, 0.4]
    val = [1.0, 0.9, 1.0, 1.1]
    return [{"epoch": i + 1, "best": i + 1 == best_epoch, "train": {"loss": t}, "val": {"loss": v}}
            for i, (t, v) in enumerate(zip(train, val, strict=True))]


def _overfitting_note(records: list[dict[str, Any]], best_epoch: int | None) -> str:
    best = records[best_epoch - 1] if best_epoch else None
    notes = [n for n in assess(records, best) if n.startswith("**Overfitting:**")]
    assert len(notes) == 1, notes
    return notes[0]


def test_no_restore_advice_when_the_best_epoch_is_the_last() -> None:
    note = _overfitting_note(_records(best_epoch=4), 4)
    assert "restore" not in note
    assert "epoch 4" in note  # says instead that the latest epoch is still the best


@pytest.mark.parametrize("best_epoch", [1, 2, 3])
def test_restore_advice_names_the_earlier_best_epoch(best_epoch: int) -> None:
    note = _overfitting_note(_records(best_epoch), best_epoch)
    assert "restore the best checkpoint" in note
    assert f"epoch {best_epoch}" in note


def test_no_restore_advice_without_a_best_epoch() -> None:
    assert "restore" not in _overfitting_note(_records(best_epoch=0), None)
