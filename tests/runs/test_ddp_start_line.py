"""Under DDP the start line shows the global batch, as the README says: rich used to read the bracketed
settings `[device cpu, ..., 2 ranks x batch 8 = global batch 16]` as a style tag and print none of them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY_ARGS = ["--model", "resnet_plus_tiny", "--image-size", "32", "--batch-size", "8", "--max-batches", "1",
             "--workers", "0", "--device", "cpu", "--bootstrap", "0", "--loader", "torch", "--epochs", "1"]


@pytest.mark.slow
def test_two_ranks_print_the_global_batch(tiny_shards: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "cornpipe", "train", str(tiny_shards), "--out", str(tmp_path / "run"),
                           "--nproc", "2", *TINY_ARGS], capture_output=True, text=True, timeout=400,
                          env={**os.environ, "COLUMNS": "1000"})  # rich wraps at 80 columns off a terminal
    assert done.returncode == 0, done.stderr[-3000:]
    start = [line for line in done.stderr.splitlines() if line.startswith("training ")]
    assert len(start) == 1, done.stderr[-3000:]  # rank 0 speaks for the group
    assert start[0].endswith(", oversample balanced, 2 ranks x batch 8 = global batch 16]"), start[0]
