"""One epoch's batches (timed), predictions and losses, collected on the device and summarised as
metrics.jsonl's "M" objects."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from cornpipe.errors import CornpipeError
from cornpipe.models.metrics import compute_metrics
from cornpipe.runs.config import TrainConfig


class TimedBatches:
    """At most `steps` batches of `loader`, timed: the epoch's wall time and the share of it spent waiting
    for the next batch (data wait). Train and validation epochs both read their batches through it.

    Data wait is the time `next(loader)` takes and nothing else: a step makes no device sync (tests/runs/
    test_no_sync.py), so on CUDA the CPU is not held waiting for the previous step's GPU work here, and the
    one synchronize, in `finish`, puts the queued work into the epoch's time, never into the wait."""

    def __init__(self, loader: Any, steps: int, device: torch.device) -> None:
        self.loader, self.steps, self.device = loader, steps, device
        self.data_wait = 0.0  # seconds spent in the loader's next()
        self.start = time.perf_counter()

    def __iter__(self) -> Iterator[Any]:
        self.start = time.perf_counter()
        batches = iter(self.loader)
        for _ in range(self.steps):
            t0 = time.perf_counter()
            batch = next(batches, None)
            self.data_wait += time.perf_counter() - t0
            if batch is None:
                return
            yield batch

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def finish(self) -> dict[str, float]:
        """{"seconds", "data_wait_s"} of the epoch, its queued GPU work included."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # sync point: the clock must include queued GPU work
        return {"seconds": self.elapsed(), "data_wait_s": self.data_wait}


class Collector:
    """Accumulates one epoch's predictions and losses on the device; one transfer at the end."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros(3, device=device)  # (total, position, grade) x batch size
        self.position_true: list[torch.Tensor] = []
        self.position_prob: list[torch.Tensor] = []
        self.grade_true: list[torch.Tensor] = []
        self.grade_pred: list[torch.Tensor] = []
        self.sample_id: list[torch.Tensor] = []
        self.images = 0

    def add(self, outputs: dict[str, torch.Tensor], position: torch.Tensor, grade: torch.Tensor,
            sample_id: torch.Tensor, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        n = position.shape[0]
        self.loss_sum += torch.stack([loss.detach(), parts["position"].detach(), parts["grade"].detach()]) * n
        self.position_prob.append(outputs["position"].detach().float().softmax(dim=1))  # (B, P)
        self.grade_pred.append(outputs["grade"].detach().float())  # (B,)
        self.position_true.append(position)
        self.grade_true.append(grade)
        self.sample_id.append(sample_id)  # (B,) int64: which manifest sample each row is
        self.images += n

    def arrays(self) -> dict[str, Any]:
        """numpy arrays for compute_metrics and the mean losses. A device sync point (.cpu())."""
        if self.images == 0:
            raise CornpipeError("an epoch produced no batches (empty split or batch size > split size)")
        means = (self.loss_sum / self.images).cpu().tolist()
        return {
            "position_true": torch.cat(self.position_true).cpu().numpy(),
            "position_prob": torch.cat(self.position_prob).cpu().numpy(),
            "grade_true": torch.cat(self.grade_true).float().cpu().numpy(),
            "grade_pred": torch.cat(self.grade_pred).cpu().numpy(),
            "sample_id": torch.cat(self.sample_id).cpu().numpy(),
            "loss": means[0], "position_loss": means[1], "grade_loss": means[2],
        }


def summarize(out: dict[str, Any], cfg: TrainConfig, data: dict[str, Any], bootstrap: int) -> dict[str, Any]:
    """compute_metrics + losses + throughput: one "M" object of metrics.jsonl."""
    metrics = compute_metrics(out["position_true"], out["position_prob"], out["grade_true"], out["grade_pred"],
                              grade_scale=data["grade_scale"], positions=data["positions"],
                              tolerance=cfg.tolerance, bootstrap=bootstrap, seed=cfg.seed)
    return {**metrics, "loss": out["loss"], "position_loss": out["position_loss"],
            "grade_loss": out["grade_loss"], "images_per_s": out["images"] / out["seconds"],
            "data_wait_share": out["data_wait_s"] / out["seconds"]}
