"""`--deterministic` (issue 23 item 4): torch's reproducibility flags are set, the run says what they cost,
the setting lands in config.json, and two runs log the same numbers."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY as BASE_TINY
from conftest import without_timing
from rich.console import Console

from cornpipe.runs.config import TrainConfig
from cornpipe.runs.tracking import CUBLAS_WORKSPACE, set_deterministic
from cornpipe.train import train

TINY = {**BASE_TINY, "bootstrap": 20, "max_batches": 2, "epochs": 2, "verify": False}


@pytest.fixture()
def torch_flags() -> Iterator[None]:
    """The flags are process-wide (as torch's own): put them back for the tests after this one."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1:]


def test_two_deterministic_runs_log_the_same_numbers(tiny_shards: Path, tmp_path: Path, torch_flags: None) -> None:
    runs = []
    for name in ("a", "b"):
        log = io.StringIO()
        train(TrainConfig(shards=str(tiny_shards), out=str(tmp_path / name), deterministic=True, **TINY),
              console=Console(file=log, width=200, markup=False))
        assert "deterministic: torch's deterministic algorithms on, cuDNN autotuning off" in log.getvalue()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert json.loads((tmp_path / name / "config.json").read_text())["deterministic"] is True
        runs.append([without_timing(json.loads(line))
                     for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    assert len(runs[0]) == 2 and runs[0] == runs[1]


def test_cuda_runs_get_cublas_a_fixed_workspace(monkeypatch: pytest.MonkeyPatch, torch_flags: None) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert set_deterministic(TrainConfig(device="cuda", deterministic=False)) is None
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # off: nothing changes
    set_deterministic(TrainConfig(device="cuda", deterministic=True))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other valid size, chosen by the user, stands
    set_deterministic(TrainConfig(device="cuda", deterministic=True))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
