"""One memory budget for a run's resident stores (issue 22 item 2): train and val share it, it is
measured once (on CUDA after empty_cache, so PyTorch's own cache of an earlier run in the process
counts as free), and a store that does not fit is one LoaderError with the numbers."""

from __future__ import annotations

import pytest
import torch

from cornpipe.errors import LoaderError
from cornpipe.loaders import make_loader
from cornpipe.loaders.backends.resident_budget import MemoryBudget
from cornpipe.loaders.base import IMAGENET


def _store(shards, split, budget):
    return make_loader(shards, split, backend="resident", batch_size=4, image_size=32, workers=1,
                       normalization=IMAGENET, oversample="none", options={"budget": budget})


def test_train_and_val_stores_share_one_budget(tiny_shards):
    train = _store(tiny_shards, "train", MemoryBudget("cpu", total=10**9))
    val = _store(tiny_shards, "val", MemoryBudget("cpu", total=10**9))
    sizes = train.nbytes, val.nbytes
    train.close(), val.close()
    # each store fits the budget alone; together they do not
    budget = MemoryBudget("cpu", total=sizes[0] + sizes[1] - 1)
    train = _store(tiny_shards, "train", budget)
    try:
        with pytest.raises(LoaderError) as err:
            _store(tiny_shards, "val", budget)
    finally:
        train.close()
    message = str(err.value)
    assert "\n" not in message and "val" in message and "train store holds" in message
    assert f"{(sizes[0] + sizes[1] - 1) / 2**30:.2f} GiB" in message  # the run's budget, in numbers


def test_a_split_loaded_again_replaces_its_own_share(tiny_shards):
    """The final evaluation loads val again: it replaces val's share, it does not take a second one."""
    train = _store(tiny_shards, "train", MemoryBudget("cpu", total=10**9))
    val = _store(tiny_shards, "val", MemoryBudget("cpu", total=10**9))
    budget = MemoryBudget("cpu", total=train.nbytes + val.nbytes)
    train.close(), val.close()
    loaders = [_store(tiny_shards, split, budget) for split in ("train", "val", "val")]
    assert budget.used == sum(loader.nbytes for loader in loaders[:2])
    for loader in loaders:
        loader.close()


def test_cuda_budget_is_measured_once_after_emptying_the_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda device=None: calls.append("mem_get_info") or (8 * 2**30, 16 * 2**30))
    budget = MemoryBudget("cuda:0")
    budget.take("train", 4 * 2**30, "train store")
    budget.take("val", 2 * 2**30, "val store")  # 6 GiB together: three quarters of free memory
    assert calls == ["empty_cache", "mem_get_info"]
    with pytest.raises(LoaderError, match=r"needs 0\.50 GiB .* 6\.00 GiB .* 8\.00 GiB free"):
        budget.take("test", 2**29, "test store")


def test_a_run_on_the_resident_loader_hands_both_splits_one_budget(tmp_path):
    from cornpipe.runs.build import build_run
    from cornpipe.runs.config import TrainConfig

    cfg = TrainConfig(shards=str(tmp_path), out=str(tmp_path / "run"), model="resnet_plus_tiny", image_size=32,
                      device="cpu", amp="off", compile=False, channels_last=False, loader="resident")
    run = build_run(cfg, ("a", "b"), (0.0, 1.0))
    budget = run.train_request(10)["options"]["budget"]
    assert isinstance(budget, MemoryBudget) and run.val_request()["options"]["budget"] is budget


def test_a_run_whose_stores_do_not_fit_together_ends_with_one_error_line(tiny_shards, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import cornpipe.loaders.backends.resident_budget as rb
    from cornpipe.cli import cli

    train = _store(tiny_shards, "train", MemoryBudget("cpu", total=10**9))
    room = train.nbytes + 1000  # the train store fits, the val store not beside it
    train.close()
    monkeypatch.setattr(rb, "free_bytes", lambda device: (room, "as measured"))
    result = CliRunner().invoke(cli, ["train", str(tiny_shards), "--out", str(tmp_path / "run"), "--loader",
                                      "resident", "--model", "resnet_plus_tiny", "--image-size", "32", "--epochs",
                                      "1", "--workers", "1", "--device", "cpu", "--no-compile"])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: resident backend needs ") and " val images " in last, result.output[-2000:]
    assert f"{room / 2**30:.2f} GiB on cpu (as measured)" in last and "the train store holds" in last
