"""The float64 reference against the paper's own numbers and closed forms."""
import math

import pytest
import torch

from kcd_fast import reference as R


def test_entropy_closed_forms():
    c = 7
    uniform = torch.zeros(3, c)
    assert torch.allclose(R.entropy(uniform), torch.full((3,), math.log(c), dtype=torch.float64))
    one_hot = torch.tensor([[0.0, -1e4, -1e4]])
    assert R.entropy(one_hot).item() == pytest.approx(0.0, abs=1e-12)
    x = torch.randn(5, 11, dtype=torch.float64)
    p = torch.softmax(x / 2.5, 1)
    assert torch.allclose(R.entropy(x, 2.5), -(p * p.log()).sum(1))
    bad = torch.randn(3, 4)
    bad[1, 2] = float("inf")
    bad[2, 0] = float("nan")
    h = R.entropy(bad)
    assert torch.isfinite(h[0]) and torch.isnan(h[1]) and torch.isnan(h[2])


def test_record_values_is_running_mean():
    values = torch.zeros(4)
    counts = torch.zeros(4, dtype=torch.int32)
    idx = torch.tensor([2, 0, 2, 2, 3])
    ent = torch.tensor([1.0, 5.0, 2.0, 6.0, float("nan")], dtype=torch.float64)
    v, f = R.record_values(values, counts, idx, ent)
    assert f.tolist() == [1, 0, 3, 0]
    assert v[2].item() == pytest.approx(3.0) and v[0].item() == pytest.approx(5.0) and v[3].item() == 0.0
    # Continuing from recorded state: (F V + e) / (F + 1).
    v2, f2 = R.record_values(v, f, torch.tensor([2]), torch.tensor([7.0], dtype=torch.float64))
    assert f2[2] == 4 and v2[2].item() == pytest.approx((3 * 3.0 + 7.0) / 4)


def test_score_and_rank_ties_by_index():
    values = torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0])
    counts = torch.tensor([1, 1, 1, 16, 1], dtype=torch.int32)
    assert R.rank(values, counts, 0.0).tolist() == [1, 2, 4, 0, 3]
    # alpha = 0.25: 0.5 * 16^0.25 = 1.0 ties with point 0, which has the lower index.
    assert R.rank(values, counts, 0.25).tolist() == [1, 2, 4, 0, 3]
    assert R.score(values, counts, 0.25)[3].item() == pytest.approx(1.0)
    never_seen = R.score(torch.tensor([0.0, 1.0]), torch.tensor([0, 0], dtype=torch.int32), 0.03)
    assert never_seen.tolist() == [0.0, 0.0]


def test_rank_likelihood():
    order = torch.tensor([3, 0, 2, 1])
    p = R.rank_likelihood(order)
    assert p.tolist() == [0.75, 0.25, 0.5, 1.0]


def test_exponential_schedule_matches_paper():
    s = 240 // 40
    taus = [R.tau(t, 0.7, s) for t in range(s)]
    assert taus[0] == pytest.approx(0.9423, abs=5e-5)
    assert taus[-1] == pytest.approx(0.7)
    assert all(a > b for a, b in zip(taus, taus[1:]))
    assert R.relative_cost(taus, 40, 240) == pytest.approx(0.816, abs=5e-4)
    # The appendix's closed form of the same sum.
    r = 0.7 ** (40 / 240)
    assert R.relative_cost(taus, 40, 240) == pytest.approx(r * (1 - 0.7) / (1 - r) * 40 / 240, rel=1e-12)
    # ImageNet: I = 90, T = 15 gives the same S = 6 and C = 81.6%.
    assert R.relative_cost([R.tau(t, 0.7, 6) for t in range(6)], 15, 90) == pytest.approx(0.8164, abs=1e-4)


def test_linear_schedule_is_official_arithmetic():
    n = 50000
    # The official code: remain -= int(N (1 - threshold) / 6), never below int(threshold N).
    remain, expected = n, []
    for _ in range(8):
        remain = max(int(0.7 * n), remain - int(n * (1 - 0.7) / 6))
        expected.append(remain)
    assert [R.num_kept(n, t, 0.7, 6, "linear") for t in range(8)] == expected
    assert [round(R.tau(t, 0.7, 6, "linear"), 6) for t in range(6)] == [0.95, 0.9, 0.85, 0.8, 0.75, 0.7]
    with pytest.raises(ValueError, match="schedule"):
        R.tau(0, 0.7, 6, "cosine")


def test_num_kept_exp_floor():
    assert R.num_kept(1000, 0, 0.7, 6) == 942
    assert R.num_kept(50000, 5, 0.7, 6) == 35000  # 0.7 * 50000 = 34999.999... in floating point


def test_vaks_eps_ramp():
    eps = R.vaks_eps(4, 0.3)
    assert eps.tolist() == pytest.approx([0.0, 0.075, 0.15, 0.225])
    # Eq. 15 with 0-based positions x' = |K1| - L + j in K1: eps_m / L (x' - |K1|) + eps_m.
    k1, l = 10, 4
    eq15 = [0.3 / l * ((k1 - l + j) - k1) + 0.3 for j in range(l)]
    assert eps.tolist() == pytest.approx(eq15)
    assert R.vaks_eps(3, 0.3, adaptive=False).tolist() == pytest.approx([0.3] * 3)
    assert R.vaks_eps(0, 0.3).numel() == 0


@pytest.mark.parametrize("policy", ["dropped", "all"])
def test_partition_sizes_and_order(policy):
    n = 20
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    prev = torch.ones(n, dtype=torch.bool)
    prev[order[15:]] = False  # the 5 lowest were already dropped before
    part = R.partition(order, 12, prev, policy)
    assert int(part.keep.sum()) == 12 and part.keep[order[:12]].all()
    if policy == "dropped":
        assert part.num_k0 == 3 and part.k0.tolist() == order[12:15].tolist()
    else:
        assert part.num_k0 == 8 and part.k0.tolist() == order[12:20].tolist()
    pairs = part.k0.numel()
    assert part.k1l.tolist() == order[12 - pairs:12].tolist()
    assert part.k1h.tolist() == order[: 12 - pairs].tolist()
    # |K1L| = min(|K0|, |K1|) when K0 outnumbers K1.
    small = R.partition(order, 3, None, "all")
    assert small.k1l.tolist() == order[:3].tolist() and small.k0.tolist() == order[3:6].tolist()
    assert small.k1h.numel() == 0


def test_vaks_mix_reference():
    buf = torch.tensor([[0.2, 0.8], [0.6, 0.4], [1.0, 0.0]])
    out = R.vaks_mix(buf, torch.tensor([0]), torch.tensor([2]), torch.tensor([0.25]))
    assert out[0].tolist() == pytest.approx([0.4, 0.6]) and torch.equal(out[1:], buf[1:])
    assert out.sum(1).tolist() == pytest.approx([1.0, 1.0, 1.0])
    img = torch.tensor([[10], [11], [200]], dtype=torch.uint8)
    mixed = R.vaks_mix(img, torch.tensor([0, 1]), torch.tensor([2, 2]), torch.tensor([0.5, 0.0]))
    assert mixed.dtype == torch.uint8 and mixed[:, 0].tolist() == [105, 11, 200]


def test_linear_schedule_shrinks_small_sets_and_ends_at_rho():
    from fractions import Fraction

    # N (1 - rho) / S = 0.5 < 1: the per-stage integer step of the official code would be 0.
    assert [R.num_kept(10, t, 0.7, 6, "linear") for t in range(6)] == [9, 9, 8, 8, 7, 7]
    for schedule in ("exp", "linear"):
        for rho in (0.7, 0.3, 0.55, 0.9, 0.07):
            for n in (1, 7, 10, 101, 1001, 50000, 1281167):
                for s in (1, 2, 3, 6, 7):
                    kept = [R.num_kept(n, t, rho, s, schedule) for t in range(s)]
                    # tau and num_kept agree: |K1| = floor(tau^t N) (Eq. 8).
                    assert kept == [R.kept_count(R.tau(t, rho, s, schedule), n) for t in range(s)]
                    assert all(a >= b for a, b in zip(kept, kept[1:]))
                    assert kept[-1] == math.floor(Fraction(str(rho)) * n), (schedule, rho, n, s)
                    assert R.tau(s - 1, rho, s, schedule) == rho  # exactly: the docstring promises it


def test_exp_schedule_counts_are_floor_of_tau_n():
    # The paper's schedule keeps floor(rho^((t+1)/S) N): on these grids, floor with a slack of 1e-9.
    for rho in (0.7, 0.3, 0.55, 0.9):
        for n in list(range(1, 300)) + [1000, 50000, 1281167]:
            for s in (1, 3, 6):
                for t in range(s):
                    floor = int(math.floor(R.tau(t, rho, s) * n + 1e-9))
                    assert R.num_kept(n, t, rho, s) == floor, (rho, n, s, t)
