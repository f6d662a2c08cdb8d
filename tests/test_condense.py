"""kcd_fast.ops.condense against the reference partition, eps and ranking."""
import pytest
import torch

from kcd_fast import reference as R
from kcd_fast.ops import CondensePlan, condense
from helpers import assert_unchanged, make_state, snapshot


def reference_plan(values, counts, n_keep, alpha, eps_max, previous_keep, policy, adaptive=True, order=None):
    order = R.rank(values, counts, alpha) if order is None else order
    part = R.partition(order, n_keep, previous_keep, policy)
    return order, part, R.vaks_eps(part.k1l.numel(), eps_max, adaptive)


@pytest.mark.parametrize("policy", ["dropped", "all"])
@pytest.mark.parametrize("n,keep", [(1, 1), (7, 0.5), (1000, 0.9423), (1001, 700), (4097, 0.7)])
@pytest.mark.parametrize("with_previous", [False, True])
def test_matches_reference(policy, n, keep, with_previous):
    values, counts = make_state(n, seed=n)
    prev = None
    if with_previous:
        prev = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.9
    plan = condense(values, counts, keep=keep, alpha=0.03, eps_max=0.3, previous_keep=prev, k0=policy)
    n_keep = keep if isinstance(keep, int) else int(keep * n + 1e-9)
    order, part, eps = reference_plan(values, counts, n_keep, 0.03, 0.3, prev, policy)
    assert isinstance(plan, CondensePlan)
    assert torch.equal(plan.order, order)
    assert plan.num_kept == n_keep and int(plan.keep.sum()) == n_keep
    assert torch.equal(plan.keep, part.keep)
    assert torch.equal(plan.k1l, part.k1l) and torch.equal(plan.k0, part.k0)
    assert torch.equal(plan.k1h, part.k1h)
    assert plan.num_k0 == part.num_k0
    assert plan.eps.dtype == torch.float32
    torch.testing.assert_close(plan.eps.double(), eps, atol=1e-7, rtol=1e-6)
    # Pairs are disjoint: K1L is kept, K0 is not.
    assert plan.keep[plan.k1l].all() and not plan.keep[plan.k0].any()


def test_dropped_policy_pairs_only_newly_dropped():
    n = 100
    values = torch.linspace(1.0, 0.01, n)  # point i ranks at position i
    counts = torch.ones(n, dtype=torch.int32)
    prev = torch.ones(n, dtype=torch.bool)
    prev[90:] = False  # already dropped at an earlier stage
    plan = condense(values, counts, keep=80, alpha=0.0, eps_max=0.3, previous_keep=prev)
    assert plan.k0.tolist() == list(range(80, 90))
    assert plan.k1l.tolist() == list(range(70, 80))
    assert plan.eps.tolist() == pytest.approx([0.03 * j for j in range(10)])
    everything = condense(values, counts, keep=80, alpha=0.0, eps_max=0.3, previous_keep=prev, k0="all")
    assert everything.k0.tolist() == list(range(80, 100)) and everything.k1l.tolist() == list(range(60, 80))


def test_ablation_switches():
    values, counts = make_state(200, seed=4)
    flat = condense(values, counts, keep=0.8, alpha=0.03, eps_max=0.3, adaptive_eps=False)
    assert torch.all(flat.eps == torch.tensor(0.3, dtype=torch.float32))
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(1))
    rnd = condense(values, counts, keep=0.8, alpha=0.03, eps_max=0.3, order=perm)
    assert torch.equal(rnd.order, perm) and rnd.keep[perm[:160]].all()
    no_cost = condense(values, counts, keep=0.8, alpha=0.0, eps_max=0.3)
    assert torch.equal(no_cost.order, R.rank(values, counts, 0.0))


def test_keep_everything_gives_no_pairs():
    values, counts = make_state(10)
    plan = condense(values, counts, keep=1.0, alpha=0.03, eps_max=0.3)
    assert plan.keep.all() and plan.k1l.numel() == 0 and plan.k0.numel() == 0 and plan.eps.numel() == 0


def test_bad_input():
    v, f = make_state(10)
    before = snapshot(v, f)
    cases = [
        (dict(keep=0), ValueError, r"keep.*\[1, 10\]"),
        (dict(keep=11), ValueError, r"keep.*\[1, 10\]"),
        (dict(keep=1.5), ValueError, "keep"),
        (dict(keep=0.01), ValueError, "keeps no point"),
        (dict(keep="half"), TypeError, "keep"),
        (dict(keep=True), TypeError, "keep"),
        (dict(keep=5, eps_max=1.5), ValueError, "eps_max"),
        (dict(keep=5, alpha=-1.0), ValueError, "alpha"),
        (dict(keep=5, k0="some"), ValueError, "k0.*dropped"),
        (dict(keep=5, adaptive_eps="no"), TypeError, "adaptive_eps.*True or False"),  # truthy, but not a ramp
        (dict(keep=5, previous_keep=torch.ones(9, dtype=torch.bool)), ValueError, "previous_keep.*shape"),
        (dict(keep=5, previous_keep=torch.ones(10)), TypeError, "previous_keep.*bool"),
        (dict(keep=5, order=torch.zeros(10, dtype=torch.int64)), ValueError, "order.*permutation"),
    ]
    for kwargs, exc, match in cases:
        args = dict(alpha=0.03, eps_max=0.3)
        args.update(kwargs)
        with pytest.raises(exc, match=match):
            condense(v, f, **args)
    assert_unchanged(before, v, f)


def test_fractional_keep_is_floor_at_any_n():
    from kcd_fast.ops import _num_kept

    # floor(keep N) of the exact decimal product; float64 gives 0.29 * 1e8 = 28999999.999999996.
    for keep, n, expected in [(0.29, 10**8, 29_000_000), (0.57, 10**8, 57_000_000), (0.58, 10**8, 58_000_000),
                              (0.7, 50000, 35000), (0.3, 10, 3), (0.5, 7, 3), (0.123456789, 10**8, 12_345_678),
                              (0.9423, 1000, 942), (0.5, 2**31 - 1, 2**30 - 1)]:
        assert _num_kept("condense", keep, n) == expected, (keep, n)
        assert R.kept_count(keep, n) == expected, (keep, n)
