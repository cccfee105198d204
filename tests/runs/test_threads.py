"""torch's CPU threads: by default the cores this process may use minus the loader's workers, so a shared
machine is not oversubscribed (torch alone takes every core while the loader decodes on the same ones)."""

from __future__ import annotations

import pytest
import torch

from cornpipe.errors import ConfigError
from cornpipe.runs import build
from cornpipe.runs.config import TrainConfig


@pytest.mark.parametrize(("cores", "workers", "threads"), [
    (2, None, 1),  # the loader's default takes both cores: the model keeps one
    (16, None, 8),  # the default workers (8) leave 8
    (16, 0, 16),  # no worker processes: every core
    (8, 6, 4),  # at least half the cores for the model
    (1, None, 1),
])
def test_auto_threads_leave_the_loader_its_cores(monkeypatch: pytest.MonkeyPatch, cores: int, workers: int | None,
                                                 threads: int) -> None:
    monkeypatch.setattr(build, "usable_cores", lambda: cores)
    monkeypatch.setattr(build, "default_workers", lambda: max(1, min(8, cores)))
    assert build.auto_threads(workers) == threads


def test_threads_given_are_set_and_zero_is_refused() -> None:
    before = torch.get_num_threads()
    try:
        assert build.set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        TrainConfig(threads=0)
