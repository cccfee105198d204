"""CORN decoding when the conditional logits are not monotone (what a half-trained head emits)."""

from __future__ import annotations

import torch

from cornpipe.models.heads import corn_level_probs, make_grade_head

SCALE = [0.0, 3.0, 5.0, 7.0, 9.0]


def corn_head_emitting(logits: list[list[float]]) -> tuple[torch.nn.Module, torch.Tensor]:
    """A CORN head whose conditional logits are `logits` (one row per feature vector fed to it)."""
    head = make_grade_head("corn", len(logits), SCALE)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor(logits).T)  # feature row i (one-hot) -> logits row i
        head.fc.bias.zero_()
    return head, torch.eye(len(logits))


def test_corn_decodes_the_median_of_the_chained_probabilities() -> None:
    # P(y > level_k) is the product of the conditionals up to k: one "no" ends the chain, whatever follows
    logits = [[-4.0, 4.0, 4.0, 4.0],  # no above level 0: grade 0, not 7 (three of four conditionals say "yes")
              [4.0, -4.0, 4.0, 4.0],  # yes, no: grade 3
              [4.0, 4.0, 4.0, -4.0],  # yes x3, no: grade 7
              [1.0, 0.5, -0.2, 3.0]]  # 0.73, 0.46 (cumulative): grade 3
    head, features = corn_head_emitting(logits)
    out = head(features)
    assert out["grade"].tolist() == [0.0, 3.0, 7.0, 3.0]
    assert torch.equal(out["grade_logits"], torch.tensor(logits))


def test_corn_level_probabilities_are_a_distribution_whose_median_is_the_grade() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 4, generator=gen) * 3).tolist()  # mostly non-monotone rows
    head, features = corn_head_emitting(logits)
    probs = corn_level_probs(torch.tensor(logits))  # (64, 5)
    assert (probs >= 0).all() and torch.allclose(probs.sum(1), torch.ones(64))
    # the decoded level: the first at which P(y <= level) passes 1/2 (the distribution's median)
    median = (probs.cumsum(1) < 0.5).sum(1)
    assert head(features)["grade"].tolist() == [SCALE[i] for i in median.tolist()]
