"""Oversampling and rank sharding (loaders.sampling): properties of the per-epoch draw."""

from __future__ import annotations

import numpy as np
import pytest

from cornpipe.errors import LoaderError
from cornpipe.loaders.base import OVERSAMPLE_STRATEGIES
from cornpipe.loaders.sampling import epoch_indices, num_batches, rank_length, sample_weights


def mix(n: int = 500, shares=(0.6, 0.3, 0.1), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions in the given shares (shuffled) and grades from a 0,3,5,7,9 scale."""
    counts = np.round(np.array(shares) * n).astype(int)
    position = np.repeat(np.arange(len(shares)), counts)
    rng = np.random.default_rng(seed)
    rng.shuffle(position)
    grade = rng.choice([0.0, 3.0, 5.0, 7.0, 9.0], size=len(position)).astype(np.float32)
    return position, grade


def test_none_is_each_row_once_shuffled_or_in_row_order():
    position, grade = mix(101)
    shuffled = epoch_indices(101, position=position, grade=grade, shuffle=True, seed=3, epoch=2)
    assert sorted(shuffled.tolist()) == list(range(101))
    assert shuffled.tolist() != list(range(101))
    ordered = epoch_indices(101, shuffle=False)
    assert ordered.tolist() == list(range(101))
    assert ordered.dtype == np.int64 and shuffled.dtype == np.int64


@pytest.mark.parametrize("strategy", OVERSAMPLE_STRATEGIES)
def test_draw_is_a_pure_function_of_seed_and_epoch(strategy):
    position, grade = mix(300)
    kw = dict(position=position, grade=grade, strategy=strategy)
    a = epoch_indices(300, seed=7, epoch=4, **kw)
    assert np.array_equal(a, epoch_indices(300, seed=7, epoch=4, **kw))
    assert not np.array_equal(a, epoch_indices(300, seed=7, epoch=5, **kw))
    assert not np.array_equal(a, epoch_indices(300, seed=8, epoch=4, **kw))
    assert len(a) == 300  # weighted epochs keep the unweighted length


@pytest.mark.parametrize("strategy", OVERSAMPLE_STRATEGIES)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_are_disjoint_slices_whose_union_is_the_epoch(strategy, world_size):
    position, grade = mix(103)
    kw = dict(position=position, grade=grade, strategy=strategy, seed=1, epoch=3)
    whole = epoch_indices(103, **kw)
    parts = [epoch_indices(103, rank=r, world_size=world_size, **kw) for r in range(world_size)]
    # Slot r, r + ws, ... of the global epoch belong to rank r: disjoint by construction, and the
    # interleaved union is the global epoch itself (no padding duplicates).
    rebuilt = np.empty(len(whole), dtype=np.int64)
    for r, part in enumerate(parts):
        rebuilt[r::world_size] = part
    assert np.array_equal(rebuilt, whole)
    lengths = [len(p) for p in parts]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == [rank_length(103, r, world_size) for r in range(world_size)]
    if strategy == "none":
        ids = [set(p.tolist()) for p in parts]
        assert sum(len(s) for s in ids) == 103 and set().union(*ids) == set(range(103))


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_even_gives_every_rank_the_same_length(world_size):
    parts = [epoch_indices(103, rank=r, world_size=world_size, even=True, seed=2) for r in range(world_size)]
    assert len({len(p) for p in parts}) == 1
    assert 103 - world_size < sum(len(p) for p in parts) <= 103
    assert len(parts[0]) == rank_length(103, 0, world_size, even=True)
    assert len(set(np.concatenate(parts).tolist())) == sum(len(p) for p in parts)


def test_balanced_gives_each_position_a_third():
    position, grade = mix(400)
    rows = epoch_indices(400, position=position, grade=grade, strategy="balanced", num_samples=20000)
    shares = np.bincount(position[rows], minlength=3) / len(rows)
    assert np.allclose(shares, 1 / 3, atol=0.02), shares


def test_sqrt_shares_follow_the_square_root_of_class_sizes():
    position, grade = mix(400)
    rows = epoch_indices(400, position=position, grade=grade, strategy="sqrt", num_samples=20000)
    shares = np.bincount(position[rows], minlength=3) / len(rows)
    expected = np.sqrt([240, 120, 40]) / np.sqrt([240, 120, 40]).sum()
    assert np.allclose(shares, expected, atol=0.02), (shares, expected)


def test_joint_lifts_rare_cells_without_exploding_singletons():
    # Cells: (0, 0) x 300, (1, 3) x 60, (2, 9) x 1; the singleton must not take a third of the epoch.
    position = np.array([0] * 300 + [1] * 60 + [2])
    grade = np.array([0.0] * 300 + [3.0] * 60 + [9.0])
    w = sample_weights(position, grade, "joint")
    assert w is not None and np.isclose(w.sum(), 1.0)
    cell_share = [w[:300].sum(), w[300:360].sum(), w[360]]
    assert cell_share[0] > cell_share[1] > cell_share[2]  # still ordered by size ...
    assert cell_share[1] > 60 / 361 and cell_share[2] > 1 / 361  # ... but rare cells are lifted
    assert cell_share[2] < 0.05  # and a lone image is not repeated a third of the epoch
    alpha = 361 / 3
    assert w.max() / w.min() <= (300 + alpha) / (1 + alpha) + 1e-9


def test_joint_balances_grades_within_a_position():
    position = np.zeros(400, dtype=np.int64)
    grade = np.array([0.0] * 300 + [9.0] * 100)
    rows = epoch_indices(400, position=position, grade=grade, strategy="joint", num_samples=20000)
    share_9 = float((grade[rows] == 9.0).mean())
    assert 0.25 + 0.05 < share_9 < 0.5  # lifted towards half, not all the way (smoothing)


def test_weights_none_and_validation_errors():
    position, grade = mix(30)
    assert sample_weights(position, grade, "none") is None
    with pytest.raises(LoaderError, match="valid: none, balanced, sqrt, joint"):
        epoch_indices(30, position=position, grade=grade, strategy="inverse")
    with pytest.raises(LoaderError, match="rank 2 is not in"):
        epoch_indices(30, rank=2, world_size=2)
    with pytest.raises(LoaderError, match="needs grade"):
        sample_weights(position, None, "joint")


def test_num_samples_sets_the_global_epoch_length():
    position, grade = mix(50)
    assert len(epoch_indices(50, num_samples=120, seed=1)) == 120
    long_none = epoch_indices(50, num_samples=120, seed=1)
    assert np.bincount(long_none, minlength=50).max() - np.bincount(long_none, minlength=50).min() <= 1
    weighted = epoch_indices(50, position=position, grade=grade, strategy="balanced", num_samples=7,
                             rank=1, world_size=2)
    assert len(weighted) == 3
    assert len(epoch_indices(0)) == 0


def test_num_batches_honours_drop_last():
    assert num_batches(10, 4, drop_last=False) == 3
    assert num_batches(10, 4, drop_last=True) == 2
    assert num_batches(0, 4, drop_last=False) == 0


# --oversample-by: the draw over position x metadata cells (loaders.cells gives the codes)

OLD_POSITION = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 0, 1])
OLD_GRADE = np.array([0, 3, 3, 5, 9, 0, 0, 3, 5, 9, 9, 0], dtype=np.float32)
# epoch_indices(12, ..., seed=3, epoch=1, num_samples=16) as the draw gave them before --oversample-by existed
OLD_DRAWS = {"balanced": [5, 7, 6, 7, 9, 10, 6, 8, 9, 9, 9, 6, 6, 11, 0, 5],
             "sqrt": [3, 6, 5, 6, 7, 10, 4, 7, 9, 8, 8, 4, 5, 11, 0, 4],
             "joint": [3, 5, 4, 5, 6, 10, 4, 6, 8, 7, 7, 3, 4, 11, 0, 3],
             "none": [0, 4, 11, 1, 2, 5, 10, 7, 9, 8, 6, 3, 5, 9, 2, 6]}


@pytest.mark.parametrize("strategy", OVERSAMPLE_STRATEGIES)
def test_the_default_keys_draw_what_runs_drew_before(strategy):
    from cornpipe.loaders.cells import cell_codes

    cells = cell_codes(("position",), [{}] * 12, OLD_GRADE)  # the default keys: no cells
    rows = epoch_indices(12, position=OLD_POSITION, grade=OLD_GRADE, strategy=strategy, seed=3, epoch=1,
                         num_samples=16, cells=cells)
    assert rows.tolist() == OLD_DRAWS[strategy]


def test_position_by_origin_gives_field_photos_a_share_of_their_own():
    """90 % lab, 10 % field photos: balanced over position x origin draws each of the 6 cells a sixth of the epoch."""
    from cornpipe.loaders.cells import cell_codes

    position, grade = mix(1000)
    origin = np.where(np.random.default_rng(1).random(len(position)) < 0.1, "field", "lab")
    samples = [{"meta": {"origin": o}} for o in origin]
    cells = cell_codes(("position", "origin"), samples, grade)
    rows = epoch_indices(len(position), position=position, grade=grade, strategy="balanced", seed=4,
                         num_samples=30000, cells=cells)
    drawn = {(p, o): np.mean((position[rows] == p) & (origin[rows] == o)) for p in range(3) for o in ("field", "lab")}
    # 30000 draws: one standard deviation of a 1/6 share is 0.002
    assert all(abs(share - 1 / 6) < 0.01 for share in drawn.values()), drawn
    assert np.mean(origin[rows] == "field") == pytest.approx(0.5, abs=0.01)  # from 10 % of the data
    position_only = epoch_indices(len(position), position=position, grade=grade, strategy="balanced", seed=4,
                                  num_samples=30000)
    assert np.mean(origin[position_only] == "field") == pytest.approx(0.1, abs=0.02)  # what the default gave


def test_a_missing_value_is_its_own_cell_and_grade_as_a_key_is_joints_own_cell():
    from cornpipe.loaders.cells import cell_codes

    samples = [{"meta": {"origin": "field"}}, {"meta": {}}, {"meta": {"origin": " "}}, {"meta": {"origin": "lab"}}]
    codes = cell_codes(("position", "origin"), samples, np.zeros(4, np.float32))[:, 0]
    assert codes[1] == codes[2] and len({codes[0], codes[1], codes[3]}) == 3  # field, unknown, lab
    position, grade = mix(300)
    by_grade = cell_codes(("position", "grade"), [{}] * len(grade), grade)
    assert np.array_equal(sample_weights(position, grade, "joint", by_grade), sample_weights(position, grade, "joint"))


def test_an_unknown_key_names_the_keys_of_the_shard_set():
    from cornpipe.loaders.cells import check_keys

    samples = [{"source": "unknown", "stage": None, "meta": {"origin": "lab"}}]
    with pytest.raises(LoaderError, match=r"camera: this shard set's keys are position, grade, origin$"):
        check_keys(("position", "camera"), samples)
