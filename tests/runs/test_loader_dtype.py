"""The batches a run's loaders deliver are in the dtype its autocast computes in (issue 22 item 3): a
bf16 run on CUDA gets bfloat16 batches, not float16 ones re-cast by autocast at the first layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cornpipe.runs.build import build_run
from cornpipe.runs.config import TrainConfig


@pytest.mark.parametrize(("device", "amp", "dtype"), [
    ("cuda", "bf16", torch.bfloat16), ("cuda", "fp16", torch.float16), ("cuda", "off", torch.float32),
    ("cpu", "bf16", torch.float32), ("cpu", "fp16", torch.float32), ("cpu", "off", torch.float32)])
def test_a_runs_loaders_deliver_batches_in_its_amp_dtype(tmp_path, device, amp, dtype):
    cfg = TrainConfig(shards=str(tmp_path), out=str(tmp_path / "run"), model="resnet_plus_tiny", image_size=32,
                      device="cpu", amp="off", compile=False, channels_last=False)
    run = build_run(cfg, ("a", "b"), (0.0, 1.0))
    # the loader keywords read only the resolved config: the CUDA rule is checked without a GPU
    run = dataclasses.replace(run, cfg=dataclasses.replace(run.cfg, device=device, amp=amp))
    assert run.loader_fields()["dtype"] == dtype
    assert run.train_request(10)["dtype"] == run.val_request()["dtype"] == dtype
