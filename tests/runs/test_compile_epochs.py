"""torch.compile over train -> eval -> train: the second epoch reuses the first epoch's graphs.

A recompile per epoch would cost a GPU run its compile time again every epoch (minutes for a resnet50d);
the first epoch compiles the train graph, its backward and the eval graph, and that is all.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY as BASE_TINY
from torch._dynamo.callback import callback_handler

from cornpipe.runs.config import TrainConfig
from cornpipe.train import train

TINY = {**BASE_TINY, "bootstrap": 0}


@pytest.mark.slow
def test_compiled_run_compiles_in_the_first_epoch_only(tiny_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"
    compiles: list[tuple[int, str]] = []  # (epochs finished when the compile started, what compiled)

    def on_start(args) -> None:  # noqa: ANN001 (torch's CallbackArgs)
        done = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        compiles.append((done, f"{args.callback_trigger.name} {args.compile_id}"))

    torch._dynamo.reset()  # a cold start: no graph left over from another test in this process
    callback_handler.register_start_callback(on_start)
    try:
        train(TrainConfig(shards=str(tiny_shards), out=str(run), epochs=2, compile=True, **TINY))
    finally:
        callback_handler.remove_start_callback(on_start)
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2]
    assert [c for c in compiles if c[0] == 0], "the first epoch compiled nothing: is compile on?"
    assert [c for c in compiles if c[0] > 0] == [], f"recompiled after the first epoch: {compiles}"
