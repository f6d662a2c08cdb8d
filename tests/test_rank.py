"""kcd_fast.ops.rank (C++ radix sort) against the reference ranking of Eq. 13."""
import math

import pytest
import torch

from kcd_fast import reference as R
from kcd_fast.ops import rank
from helpers import assert_unchanged, make_state, snapshot


def assert_same_ranking(order, values, counts, alpha):
    """``order`` must equal the reference order.

    The score's float64 pow may differ in its last bit between libm and torch;
    where that moves a key across a float32 rounding boundary, the two
    orders may swap points whose keys are one float32 step apart. Any other
    difference fails.
    """
    ref = R.rank(values, counts, alpha)
    assert order.dtype == torch.int64 and order.shape == ref.shape
    if torch.equal(order, ref):
        return
    assert torch.equal(torch.sort(order).values, torch.arange(order.numel())), "not a permutation"
    keys = R.ranking_keys(values, counts, alpha)
    diff = (order != ref).nonzero().flatten()
    k_fast, k_ref = keys[order[diff]], keys[ref[diff]]
    one_step = (torch.nextafter(k_fast, torch.tensor(math.inf)) >= k_ref) & (
        torch.nextafter(k_fast, torch.tensor(-math.inf)) <= k_ref)
    assert one_step.all(), f"{diff.numel()} positions differ by more than one float32 step"
    assert diff.numel() <= 8, f"{diff.numel()} positions differ"


@pytest.mark.parametrize("n", [1, 3, 127, 1000, 1001, 65537])
@pytest.mark.parametrize("alpha", [0.0, 0.03, 1.0])
def test_matches_reference(n, alpha):
    values, counts = make_state(n, seed=n)
    assert_same_ranking(rank(values, counts, alpha), values, counts, alpha)


def test_ties_broken_by_lower_index():
    n = 5000
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (n,), generator=g).float()  # few distinct values: many ties
    counts = torch.randint(0, 3, (n,), generator=g, dtype=torch.int32)
    for alpha in (0.0, 0.03):
        order = rank(values, counts, alpha)
        assert torch.equal(order, R.rank(values, counts, alpha))
    equal = rank(torch.ones(n), torch.ones(n, dtype=torch.int32), 0.03)
    assert torch.equal(equal, torch.arange(n))


def test_zero_and_negative_zero_tie():
    values = torch.tensor([0.0, -0.0, 0.0, 1.0])
    counts = torch.tensor([1, 1, 0, 1], dtype=torch.int32)
    assert rank(values, counts, 0.5).tolist() == [3, 0, 1, 2]


@pytest.mark.slow
def test_imagenet_size():
    n = 1_281_167
    values, counts = make_state(n, seed=11, max_count=15)
    assert_same_ranking(rank(values, counts, 0.03), values, counts, 0.03)


def test_bad_input():
    v, f = make_state(10)
    before = snapshot(v, f)
    with pytest.raises(TypeError, match="values.*float32"):
        rank(v.half(), f, 0.03)
    with pytest.raises(TypeError, match="counts.*int32"):
        rank(v, f.long(), 0.03)
    with pytest.raises(ValueError, match="counts.*shape"):
        rank(v, f[:3], 0.03)
    with pytest.raises(ValueError, match="alpha"):
        rank(v, f, -0.1)
    with pytest.raises(ValueError, match="alpha"):
        rank(v, f, math.nan)
    bad = v.clone()
    bad[3] = math.nan
    with pytest.raises(ValueError, match="values.*finite"):
        rank(bad, f, 0.03)
    neg = f.clone()
    neg[2] = -1
    with pytest.raises(ValueError, match="counts.*>= 0"):
        rank(v, neg, 0.03)
    assert_unchanged(before, v, f)


def test_rank_counts_beyond_the_cost_table():
    # F^alpha for F >= 512 is computed outside the table: 1.0 * 600^0.5 = 24.49 < 1.1 * 511^0.5 = 24.87
    values = torch.tensor([1.0, 1.1])
    counts = torch.tensor([600, 511], dtype=torch.int32)
    assert rank(values, counts, 0.5).tolist() == [1, 0] == R.rank(values, counts, 0.5).tolist()


def test_rank_nan_key_ranks_last():
    values = torch.tensor([0.0, 0.5, 1.0])
    counts = torch.tensor([2**31 - 1, 1, 1], dtype=torch.int32)
    assert rank(values, counts, 1000.0).tolist() == [2, 1, 0] == R.rank(values, counts, 1000.0).tolist()
