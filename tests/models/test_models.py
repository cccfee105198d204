"""ResNet-Plus contract over every registered model, the heads, and that the model learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.resnet import BasicBlock, Bottleneck

from cornpipe.errors import ModelConfigError
from cornpipe.models import MODELS, create_model
from cornpipe.models.heads import corn_level_probs, corn_loss
from cornpipe.models.losses import MultiTaskLoss
from cornpipe.models.resnet_plus import blur_pool

SCALE = [0, 3, 5, 7, 9]

pytestmark = pytest.mark.usefixtures("one_thread")


def _contract(name: str, grade_head: str, **kw) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_positions=3, grade_scale=SCALE, grade_head=grade_head, **kw)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            out = model(x)
        assert out["position"].shape == (2, 3)
        assert out["grade"].shape == (2,)
        assert out["grade"].dtype == torch.float32
        assert all(torch.isfinite(v).all() for v in out.values())
        assert ((out["grade"] >= 0) & (out["grade"] <= 9)).all()
        if grade_head == "corn":
            assert out["grade_logits"].shape == (2, len(SCALE) - 1)
            assert set(out["grade"].tolist()) <= set(map(float, SCALE))
    assert model.forward_features(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_meets_the_output_contract(name: str) -> None:
    # resnet_plus50 once, with every option on; the CORN head on the others is covered by tiny below
    options = {"grade_head": "corn", "drop_path": 0.1, "anti_alias": True} if name == "resnet_plus50" else {}
    _contract(name, options.pop("grade_head", "regression"), **options)


@pytest.mark.parametrize("grade_head", ["regression", "corn"])
def test_tiny_with_anti_alias_and_drop_path(grade_head: str) -> None:
    _contract("resnet_plus_tiny", grade_head, drop_path=0.2, anti_alias=True)


def test_unknown_names_list_the_choices() -> None:
    with pytest.raises(ValueError, match="resnet_plus18, resnet_plus34, resnet_plus50"):
        create_model("resnet18", num_positions=3, grade_scale=SCALE)
    with pytest.raises(ModelConfigError, match="regression, corn"):
        create_model("resnet_plus_tiny", num_positions=3, grade_scale=SCALE, grade_head="ordinal")
    with pytest.raises(ModelConfigError, match="ascending"):
        create_model("resnet_plus_tiny", num_positions=3, grade_scale=[0, 5, 3])


def test_regression_grade_spans_the_scale_range() -> None:
    model = create_model("resnet_plus_tiny", num_positions=3, grade_scale=[5, 10, 25]).eval()
    head = model.heads["grade"]
    with torch.no_grad():
        head.fc.bias.fill_(30.0)
        assert model(torch.randn(1, 3, 32, 32))["grade"].item() == pytest.approx(25.0, abs=1e-5)
        head.fc.bias.fill_(-30.0)
        assert model(torch.randn(1, 3, 32, 32))["grade"].item() == pytest.approx(5.0, abs=1e-5)


def test_residual_branches_start_as_identity() -> None:
    """Zero-initialised last BN gamma: at init a block outputs relu(shortcut(x))."""
    model = create_model("resnet_plus_tiny", num_positions=3, grade_scale=SCALE).eval()
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == 4
    with torch.no_grad():
        for block in blocks:
            x = torch.randn(2, block.conv1.in_channels, 16, 16)
            shortcut = x if block.downsample is None else block.downsample(x)
            assert torch.allclose(block(x), F.relu(shortcut))


def test_drop_path_rates_grow_linearly_and_only_act_in_training() -> None:
    model = create_model("resnet_plus_tiny", num_positions=3, grade_scale=SCALE, drop_path=0.3)
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    rates = [0.0 if b.drop_path is None else b.drop_path.drop_prob for b in blocks]  # none at rate 0
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    drop = DropPath(0.5).train()
    x = torch.ones(256, 4, 2, 2)
    y = drop(x)
    kept = y[:, 0, 0, 0] != 0
    assert 0.3 < kept.float().mean() < 0.7  # whole samples dropped, survivors rescaled by 1/keep
    assert torch.all(y[kept] == 2.0)
    assert torch.equal(drop.eval()(x), x)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x)["position"], model(x)["position"])


def test_blur_pool_low_passes_and_halves() -> None:
    blur = blur_pool()(3)
    flat = torch.full((1, 3, 8, 8), 5.0)
    assert torch.allclose(blur(flat), torch.full((1, 3, 4, 4), 5.0))  # a constant stays constant
    stripes = torch.zeros(1, 3, 8, 8)
    stripes[..., ::2] = 1.0  # highest frequency: strided sampling would alias it to all-ones
    out = blur(stripes)
    assert torch.allclose(out[..., 1:-1, 1:-1], torch.full_like(out[..., 1:-1, 1:-1], 0.5))
    assert blur(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)  # works on 1-pixel maps


def test_bf16_autocast_on_cpu_keeps_grade_float32() -> None:
    model = create_model("resnet_plus_tiny", num_positions=3, grade_scale=SCALE, grade_head="corn")
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        total, _ = MultiTaskLoss(grade_scale=SCALE, grade_head="corn")(out, torch.tensor([0, 2]),
                                                                         torch.tensor([0.0, 9.0]))
    assert out["grade"].dtype == torch.float32 and out["position"].dtype == torch.float32
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_loss_weights_apply_in_position_grade_order() -> None:
    outputs = {"position": torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), "grade": torch.tensor([1.0, 8.0])}
    position, grade = torch.tensor([1, 2]), torch.tensor([3.0, 9.0])
    total, parts = MultiTaskLoss(weights=(0.9, 0.1), grade_scale=SCALE)(outputs, position, grade)
    assert parts["position"] > 2 * parts["grade"]  # so the two orders give different totals
    assert total.item() == pytest.approx(0.9 * parts["position"].item() + 0.1 * parts["grade"].item())


def test_corn_round_trip() -> None:
    """Levels -> ideal CORN logits -> decoded grade gives the levels back; loss favours the truth."""
    levels = torch.tensor(SCALE, dtype=torch.float32)
    index = torch.arange(len(SCALE))  # every level once
    k = torch.arange(len(SCALE) - 1)
    ideal = torch.where(index[:, None] > k, 8.0, -8.0)  # P(y > level_k | y > level_{k-1})
    model = create_model("resnet_plus_tiny", num_positions=3, grade_scale=SCALE, grade_head="corn")
    head = model.heads["grade"]
    with torch.no_grad():  # route features straight to chosen logits: zero weights, bias per sample
        head.fc.weight.zero_()
        decoded = []
        for row in ideal:
            head.fc.bias.copy_(row)
            decoded.append(head(torch.zeros(1, model.num_features))["grade"].item())
    assert decoded == SCALE
    probs = corn_level_probs(ideal)
    assert torch.allclose(probs.sum(1), torch.ones(len(SCALE)))
    assert torch.equal(probs.argmax(1), index)
    assert corn_loss(ideal, index) < 0.01
    assert corn_loss(ideal, index.flip(0)) > 1.0
    loss = MultiTaskLoss(grade_scale=SCALE, grade_head="corn")
    assert torch.equal(loss.level_index(levels), index)


@pytest.mark.parametrize("grade_head", ["regression", "corn"])
def test_model_overfits_a_tiny_batch(grade_head: str) -> None:
    torch.manual_seed(0)
    model = create_model("resnet_plus_tiny", num_positions=3, grade_scale=SCALE, grade_head=grade_head)
    loss_fn = MultiTaskLoss(grade_scale=SCALE, grade_head=grade_head)
    x = torch.randn(8, 3, 32, 32)
    position = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    grade = torch.tensor([0.0, 3.0, 5.0, 7.0, 9.0, 0.0, 5.0, 9.0])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        total, _ = loss_fn(model(x), position, grade)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < 0.25 * losses[0], losses[::8]
    with torch.no_grad():  # batch statistics, as in the steps above: running stats lag 20 steps behind
        out = model(x)
    assert torch.equal(out["position"].argmax(1), position)
    assert (out["grade"] - grade).abs().mean() < 1.5


def test_traces_as_one_graph_for_torch_compile() -> None:
    """fullgraph=True fails on any graph break (Python control flow on tensor values, .item()).

    The "eager" backend runs Dynamo's tracing without Inductor's code generation, which takes a
    minute on a busy 2-core machine; the trainer's compile test covers Inductor.
    """
    model = create_model("resnet_plus_tiny", num_positions=3, grade_scale=SCALE, grade_head="corn",
                         drop_path=0.1, anti_alias=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad():
        out = compiled(x)
        ref = model(x)
    assert torch.allclose(out["position"], ref["position"], atol=1e-4)
    assert torch.equal(out["grade"], ref["grade"])
    model.train()  # drop path and batch statistics take the training branches
    compiled(x)["position"].sum().backward()
