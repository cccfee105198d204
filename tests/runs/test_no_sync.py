"""No blocking host<->device transfer in a steady-state training or validation step (issue 22 item 1).

Each blocking host->device copy or host read of a device value is a full device sync on CUDA: the CPU
cannot queue the next step while the GPU runs this one. The CPU test runs the CUDA code of the trainer,
the loss and the resident loader (roi_align crops, tensor-op jitter and normalisation) on CPU tensors
and counts, per step, the calls cornpipe's own code makes that would block on CUDA; the `gpu` test
runs the same steps under torch.cuda.set_sync_debug_mode("error"), which also catches torch's own.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import cornpipe
from cornpipe.loaders import make_loader
from cornpipe.runs.build import build_run
from cornpipe.runs.config import TrainConfig
from cornpipe.runs.evaluation import evaluate
from cornpipe.runs.optim import make_optimizer
from cornpipe.shards.shard_set import ShardSet
from cornpipe.train import train_one_epoch

PACKAGE = str(Path(cornpipe.__file__).parent)
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")  # a device value read on the host


def _ours() -> bool:
    """Whether the patched call comes from cornpipe's code (not torch's, not a test's)."""
    name = sys._getframe(2).f_code.co_filename
    # a venv inside the checkout (make test's .venv) holds torch under PACKAGE too: its files are not ours
    return (name.startswith(PACKAGE) and f"{PACKAGE}/tests/" not in name and "site-packages" not in name
            and not name.startswith(sys.prefix))


def _has_device(args: tuple, kwargs: dict) -> bool:
    return "device" in kwargs or any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args)


class SyncCounter:
    """Counts, by name, the calls cornpipe's code makes that would block on CUDA."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        for name in READS:
            self._wrap(monkeypatch, torch.Tensor, name, lambda *a, **k: True)
        # host -> device: a copy to a device that is not non_blocking, or a tensor built on a device
        self._wrap(monkeypatch, torch.Tensor, "to",
                   lambda self, *a, **k: _has_device(a, k) and not k.get("non_blocking", False))
        self._wrap(monkeypatch, torch.Tensor, "cuda", lambda *a, **k: True)
        for name in ("tensor", "as_tensor"):
            self._wrap(monkeypatch, torch, name, lambda *a, **k: k.get("device") is not None)

    def _wrap(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, blocks: Any) -> None:
        original = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            if _ours() and blocks(*args, **kwargs):
                self.calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


class PerStep:
    """The loader, with a snapshot of the counter at each batch handed out: the difference between
    two snapshots is what one whole step did (its batch's augmentation included)."""

    def __init__(self, loader: Any, counter: SyncCounter) -> None:
        self.loader, self.counter, self.snapshots = loader, counter, []

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.snapshots.append(Counter(self.counter.calls))
            yield batch

    def steady(self) -> list[Counter]:
        """What each step after the first did (the first builds the per-run constants)."""
        s = self.snapshots
        return [s[i + 1] - s[i] for i in range(1, len(s) - 1)]


class NoProgress:
    def update(self, *args: Any, **kwargs: Any) -> None:
        pass


def _steps(shards: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, grade_head: str) -> tuple[list, list]:
    """Per-step counts of one train and one validation epoch of the CUDA code, on CPU tensors."""
    # the loss's per-batch grade check reads its flag on the host only on the CPU; take the CUDA branch
    monkeypatch.setattr("cornpipe.models.losses.checks_on_host", lambda t: False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TrainConfig(shards=str(shards), out=str(tmp_path / "run"), loader="resident", model="resnet_plus_tiny",
                      image_size=32, batch_size=4, workers=1, device=device, amp="off", grade_head=grade_head,
                      compile=False, grad_clip=1.0)
    shard_set = ShardSet(shards)
    run = build_run(cfg, shard_set.positions, shard_set.grade_scale)
    cfg = run.cfg
    # roi_align crops + tensor-op jitter and normalisation: the resident loader's CUDA path
    fields = dict(run.loader_fields(), options={"crop_kernel": "roi_align"})
    train_loader = make_loader(shards, "train", **fields, oversample="none")
    val_loader = make_loader(shards, "val", **fields, oversample="none", shuffle=False)
    optimizer = make_optimizer(run.model, cfg)
    scaler = torch.amp.GradScaler(run.device.type, enabled=False)
    counter = SyncCounter(monkeypatch)
    train_steps, val_steps = PerStep(train_loader, counter), PerStep(val_loader, counter)
    try:
        train_one_epoch(run.model, train_steps, run.loss_fn, optimizer, scaler, None, cfg, epoch=0,
                        steps=len(train_loader), last_good="none", progress=NoProgress(), task=None)
        evaluate(run.model, val_steps, run.loss_fn, cfg, steps=len(val_loader), progress=NoProgress(), task=None)
    finally:
        train_loader.close()
        val_loader.close()
    return train_steps.steady(), val_steps.steady()


@pytest.mark.parametrize("grade_head", ["regression", "corn"])
def test_steady_state_steps_make_no_blocking_transfer(tiny_shards: Path, monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path, grade_head: str) -> None:
    train, val = _steps(tiny_shards, monkeypatch, tmp_path, grade_head)
    assert len(train) >= 3 and len(val) >= 1  # steps after the first, before the last
    assert all(not c for c in train), f"blocking transfers per training step: {train}"
    assert all(not c for c in val), f"blocking transfers per validation step: {val}"


def test_finisher_tensor_ops_make_no_blocking_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The finish step ffcv, dali and the torch backend run on CUDA (tensor ops): after its first batch
    (its constants built), a batch's jitter factors travel without blocking, and nothing is read back."""
    import numpy as np

    from cornpipe.loaders.base import IMAGENET
    from cornpipe.loaders.pixels.finish import Finisher

    finish = Finisher(torch.device("cpu"), torch.float32, jitter=True, channels_last=True, tensor_ops=True,
                      norm=IMAGENET)
    pixels = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    factors = np.random.default_rng(0).uniform(0.8, 1.2, (4, 3)).astype(np.float32)
    finish(pixels, factors)
    counter = SyncCounter(monkeypatch)
    for _ in range(3):
        finish(pixels, factors)
    assert not counter.calls, dict(counter.calls)


def test_the_counter_sees_a_blocking_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter the test above relies on counts what cornpipe's code would block on."""
    from cornpipe.models.losses import MultiTaskLoss

    counter = SyncCounter(monkeypatch)
    loss = MultiTaskLoss(grade_head="corn")
    loss.level_index(torch.tensor([0.0, 3.0]))  # the CPU branch reads its check on the host
    assert counter.calls["__bool__"] == 1
    from cornpipe.loaders.pixels.finish import _constant

    _constant.__wrapped__((1.0, 2.0, 3.0), torch.float32, torch.device("cpu"))  # a blocking copy, uncached
    assert counter.calls["to"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_steady_state_steps_do_not_sync_on_cuda(tiny_shards: Path, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    """The same steps on a GPU, torch's own syncs included: any sync after the first step raises."""

    class SyncErrors(PerStep):
        def __iter__(self) -> Iterator[Any]:
            for i, batch in enumerate(self.loader):
                torch.cuda.set_sync_debug_mode("error" if 0 < i < len(self.loader) - 1 else "default")
                yield batch
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(sys.modules[__name__], "PerStep", SyncErrors)
    try:
        _steps(tiny_shards, monkeypatch, tmp_path, "regression")
    finally:
        torch.cuda.set_sync_debug_mode("default")
