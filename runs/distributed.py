"""Data-parallel training on torchrun + DistributedDataParallel: the process group and its few collectives.

Started by torchrun (`torchrun --nproc_per_node N -m cornpipe train ...`, or `cornpipe train --nproc N`
which launches it), every process reads its place from torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT) and joins one process group: NCCL on GPUs (one GPU per process,
cuda:LOCAL_RANK), gloo on the CPU. Without those variables (or with WORLD_SIZE=1) nothing is
initialised and every helper here is a no-op, so a single process runs exactly as before.

Failures: every collective runs under the process group's timeout (TrainConfig.dist_timeout), and
torchrun tears the whole group down when one worker exits non-zero, so a failing rank never leaves
the others waiting. A failing rank's one-line error names it (`rank 1 of 2: ...`) and, when the
launcher asked for it (CORNPIPE_FAILURE_DIR, set by `cornpipe train --nproc`), is also written to
a file there so that the launcher can repeat it as its own one-line error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cornpipe.errors import ConfigError, CornpipeError

FAILURE_DIR_ENV = "CORNPIPE_FAILURE_DIR"  # where a failing rank leaves its one-line error (launcher's)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the group; world_size 1 = a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes metrics.jsonl, reports, plots and checkpoints."""
        return self.rank == 0

    def label(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def env_context() -> DistContext:
    """Where torchrun put this process (its environment variables); rank 0 of 1 outside torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ConfigError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from None
    return DistContext(rank=rank, world_size=world, local_rank=local)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(ctx: DistContext, device: str, timeout_s: float) -> str:
    """Join the process group (NCCL on CUDA, gloo on the CPU); returns this rank's device.

    A CUDA run puts rank r on cuda:LOCAL_RANK (one GPU per process, as torchrun expects)."""
    if not ctx.enabled:
        return device
    on_cuda = device.startswith("cuda")
    if on_cuda:
        if ctx.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"{ctx.label()}: LOCAL_RANK {ctx.local_rank} but only "
                              f"{torch.cuda.device_count()} GPU(s) here; use --nproc_per_node <= GPUs")
        device = f"cuda:{ctx.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if on_cuda:
            kwargs["device_id"] = torch.device(device)  # NCCL: bind the communicator to this GPU eagerly
        dist.init_process_group("nccl" if on_cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                rank=ctx.rank, world_size=ctx.world_size, **kwargs)
    return device


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DistributedDataParallel (in either order)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def broadcast_buffers(ctx: DistContext, module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics): DDP syncs parameters through
    the gradients, but each rank's last forward left its own running statistics, and validation must
    use the same model on every rank (rank 0's is the one checkpointed)."""
    if ctx.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def broadcast_value(ctx: DistContext, value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank: one decision for the whole group."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_outputs(ctx: DistContext, out: dict[str, Any], rows: np.ndarray | None = None) -> dict[str, Any]:
    """One epoch's predictions from every rank, as if one process had seen them all.

    `out` is train_one_epoch's / evaluate's dict. Arrays are concatenated; with `rows` (the split rows
    this rank predicted, in its order) they are put back in row order, so that validation metrics and
    their bootstrap intervals equal a single process's over the same split. Mean losses are weighted by
    each rank's image count; the time is the slowest rank's."""
    if not ctx.enabled:
        return out
    mine = {"out": out, "rows": None if rows is None else np.asarray(rows)[:out["images"]]}
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, mine)  # every rank gets every rank's arrays (small: N x positions)
    outs = [p["out"] for p in parts]
    images = sum(o["images"] for o in outs)
    merged: dict[str, Any] = {
        "images": images,
        "seconds": max(o["seconds"] for o in outs),
        "data_wait_s": max(o["data_wait_s"] for o in outs),
    }
    for key in ("loss", "position_loss", "grade_loss"):
        merged[key] = sum(o[key] * o["images"] for o in outs) / images
    order = None
    if rows is not None:
        all_rows = np.concatenate([p["rows"] for p in parts])
        if len(np.unique(all_rows)) != len(all_rows):
            raise RuntimeError("validation shards overlap across ranks")  # a bug, not a user error
        order = np.argsort(all_rows, kind="stable")
    for key in ("position_true", "position_prob", "grade_true", "grade_pred", "sample_id"):
        joined = np.concatenate([o[key] for o in outs])
        merged[key] = joined if order is None else joined[order]
    return merged


def name_failure(ctx: DistContext, exc: BaseException) -> None:
    """Prefix a failing rank's error with the rank (its message stays one line) and, under
    `cornpipe train --nproc`, leave it where the launcher reads it."""
    if not ctx.enabled:
        return
    message = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, CornpipeError):  # a bug: keep its type in the line (the traceback follows)
        message = f"{type(exc).__name__}: {message}"
    if not message.startswith("rank "):
        message = f"{ctx.label()}: {message}"
        if isinstance(exc, CornpipeError):
            exc.args = (message,)  # the CLI prints `Error: rank 1 of 2: <cause>`
    folder = os.environ.get(FAILURE_DIR_ENV)
    if folder:
        try:
            (Path(folder) / f"rank{ctx.rank}.txt").write_text(message)
        except OSError:
            pass  # the launcher falls back to torchrun's exit code


# `python -m torch.distributed.run`, except that its parser takes no abbreviations: with them, a forwarded
# `--monitor loss` reads as an ambiguous prefix of torchrun's own --monitor-interval and fails the launch
TORCHRUN = ("from torch.distributed import run\n"
            "from torch.distributed.elastic.multiprocessing.errors import record\n"
            "parser = run.get_args_parser()\n"
            "parser.allow_abbrev = False\n"
            "record(lambda: run.run(parser.parse_args()))()\n")


def launch(nproc: int, train_args: list[str]) -> None:
    """`cornpipe train --nproc N`: run `python -m cornpipe train TRAIN_ARGS` on N processes of this machine
    with torchrun (`torch.distributed.run --standalone`: a free local rendezvous port). `cornpipe cv
    --nproc N` and `train --seeds --nproc N` call it once per run.

    torchrun's own failure handling applies: when one worker exits non-zero it stops the others. The
    first failing rank's one-line error then becomes this call's DistributedError."""
    import subprocess
    import sys
    import tempfile

    from cornpipe.errors import DistributedError

    if under_torchrun():
        raise ConfigError("--nproc launches torchrun; under torchrun already, leave --nproc out")
    with tempfile.TemporaryDirectory(prefix="cornpipe-ranks-") as failures:
        cmd = [sys.executable, "-c", TORCHRUN, "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(nproc), "-m", "cornpipe", "train", *train_args]
        code = subprocess.run(cmd, env={**os.environ, FAILURE_DIR_ENV: failures}, check=False).returncode
        if code == 0:
            return
        reports = sorted(Path(failures).glob("rank*.txt"), key=lambda p: p.stat().st_mtime_ns)
        if reports:  # the first rank to fail; the others were stopped by torchrun (or failed after it)
            raise DistributedError(reports[0].read_text().strip())
        raise DistributedError(f"distributed training failed (torchrun exit code {code}); "
                               "the ranks' output above says where")
