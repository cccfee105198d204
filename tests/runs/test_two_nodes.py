"""Two machines (issue 22 item 7): two torchrun agents, one process each, meet as two nodes over a c10d
rendezvous on the loopback (gloo) and write one run whose metrics are the ones a 2-rank run on one
machine gives: nothing in a run depends on whether its ranks share a machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_ddp import TINY_ARGS, cornpipe, records, without_timing

from cornpipe.runs.distributed import TORCHRUN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_the_loopback_write_the_run_two_local_ranks_write(tiny_shards: Path, tmp_path: Path) -> None:
    args = ["train", str(tiny_shards), "--epochs", "2", *TINY_ARGS]
    local = cornpipe(*args[:2], "--out", tmp_path / "one-machine", "--nproc", "2", *args[2:])
    assert local.returncode == 0, local.stderr[-3000:]

    port, run = free_port(), tmp_path / "two-machines"
    # torchrun sets OMP_NUM_THREADS=1 only for several processes per node; the same threads, the same sums
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = []
    for node in (0, 1):  # node 0 hosts the rendezvous store; each node the same shard set at the same path
        agents.append(subprocess.Popen(
            [sys.executable, "-c", TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
             "--rdzv-conf", f"is_host={node == 0}", "--local-addr", "127.0.0.1",
             "-m", "cornpipe", *args[:2], "--out", str(run), *args[2:]],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = [agent.communicate(timeout=600) for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(err[-2000:] for _out, err in outputs)

    assert json.loads((run / "config.json").read_text())["data"]["world_size"] == 2
    assert [r["epoch"] for r in records(run)] == [1, 2]  # one writer: rank 0, on whichever node it is
    assert [without_timing(r) for r in records(run)] == [without_timing(r) for r in records(tmp_path / "one-machine")]
