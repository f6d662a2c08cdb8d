"""protocol="official" against an independent numpy emulation of the official KCD selection.

The emulation below (``OfficialEmulation``, ``emulated_eps``, ``emulated_mix``) is written from the
specification of github.com/dzy3/KCD (dataset/cifar100.py ``update_dataset_mul_entropy_V3`` and
``MIXUPDataset``; super_train_student.py's epoch loop), not from kcd_fast's code:

* record: an (N x epochs) float64 history; each epoch's column starts at -1 and every training
  visit writes the student's entropy there (last write wins);
* score: S = sum(clip(rec, 0, rec.max())), F = #(rec > 0), V = S / F,
  score = (F / 40.0) ** 0.03 * V, in float64;
* ranking: descending score, ties broken as ``np.argsort(score, kind="stable")[::-1]``
  (the higher index first), kcd_fast's documented rule for the official unstable sort;
* condensation after every 1-based epoch e with e % T == 0, the last epoch included;
* counts: d = int(N (1 - rho) / 6), f = int(rho N), k_new = max(pre - d, f);
* K1 = ranking[:k_new], K0 = ranking[k_new:pre], K1L = ranking[k_new - L:k_new], L = pre - k_new;
* eps_j = 1 - r_j, r_j = f32(f32(0.3 * f32(f32(L - j) / L)) + 0.7), all float32;
* mixing of uint8 pixels in place: m = f32(f32(a r_j) + f32(b eps_j)), truncated toward zero,
  both sides read before any write; compounding across stages.

kcd_fast's entropies (the float32 values ``observe`` returns) are fed to the emulation, so both
sides rank the same inputs and every comparison is exact (bit-equal).
"""
import warnings

import numpy as np
import pytest
import torch

import kcd_fast
from kcd_fast import official, ops, reference

EMPTY_WINDOW = "K0 window is empty"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for these tests: their tensors are small per call, and on a loaded
    2-core machine torch's OpenMP threads spinning against another process make the whole runs
    20x slower than a single thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# The emulation
# ------------------------------------------------------------------------------------------------

def emulated_counts(n, rho, pre):
    """(k_new, L) of one official condensation from the previous kept count ``pre``."""
    d = int(n * (1 - rho) / 6)
    f = int(rho * n)
    k_new = f if pre - d < f else pre - d
    return k_new, pre - k_new


def emulated_eps(num_pairs):
    """(r, eps) float32 [L] of the official MIXUPDataset, pair position j = 0..L-1."""
    length = np.float32(num_pairs)
    j = np.arange(num_pairs, dtype=np.float32)
    frac = (length - j) / length                          # f32(f32(L - j) / L)
    r = np.float32(1 - 0.7) * frac                        # f32(0.3 * .)
    r = r + np.float32(0.7)                               # f32(. + 0.7)
    eps = np.float32(1.0) - r
    assert r.dtype == np.float32 and eps.dtype == np.float32
    return r, eps


def emulated_mix(images, k1l, k0, r, eps):
    """The official in-place pixel mix of uint8 ``images`` (numpy), rows ``k1l`` with ``k0``."""
    shape = (-1,) + (1,) * (images.ndim - 1)
    a = images[k1l].astype(np.float32)                    # both snapshots before any write
    b = images[k0].astype(np.float32)
    m = a * r.reshape(shape) + b * eps.reshape(shape)     # f32(f32(a r) + f32(b eps))
    assert m.dtype == np.float32
    images[k1l] = np.trunc(m).astype(np.uint8)            # torch.tensor(m, dtype=uint8): toward 0


class OfficialEmulation:
    """The official selection, one epoch at a time (numpy, float64 record)."""

    def __init__(self, n, rho, epochs, stage_epochs):
        self.n, self.rho, self.epochs, self.stage_epochs = n, rho, epochs, stage_epochs
        self.record = np.empty((n, epochs), dtype=np.float64)
        self.kept = np.arange(n)                          # remain: the first stage is all of N
        self.epoch = 0                                    # 1-based epochs recorded so far

    def start_epoch(self):
        self.record[:, self.epoch] = -1.0

    def visit(self, indices, entropy):
        self.record[indices, self.epoch] = entropy        # last write wins

    def end_epoch(self):
        """Close the epoch; return the condensation (dict) when e % T == 0, else None."""
        self.epoch += 1
        e = self.epoch
        if e % self.stage_epochs != 0:
            return None
        rec = np.ascontiguousarray(self.record[:, :e])    # (N, e), like the appended history
        total = np.clip(rec, 0, rec.max()).sum(axis=1)
        count = np.where(rec > 0.0, 1.0, 0.0).sum(axis=1)
        value = np.true_divide(total, count)
        score = (count / 40.0) ** 0.03 * value
        order = np.argsort(score, kind="stable")[::-1]
        pre = len(self.kept)
        k_new, num_pairs = emulated_counts(self.n, self.rho, pre)
        k0 = order[k_new:pre]
        k1l = order[k_new - num_pairs:k_new]
        r, eps = emulated_eps(num_pairs)
        previous = np.zeros(self.n, dtype=bool)
        previous[self.kept] = True
        self.kept = order[:k_new]
        keep = np.zeros(self.n, dtype=bool)
        keep[self.kept] = True
        return dict(order=order.copy(), keep=keep, previous=previous, k1l=k1l.copy(), k0=k0.copy(),
                    r=r, eps=eps, num_kept=k_new, score=score)


# ------------------------------------------------------------------------------------------------
# Driving kcd_fast and the emulation side by side
# ------------------------------------------------------------------------------------------------

def make_tie_groups(n, rng):
    """leader [n]: each sample copies the logits of ``leader[i]`` (itself for most samples).

    About 6 % of the samples are in groups of 2..5 with identical logits every epoch, so their
    entropies and, while their histories agree, their scores tie exactly.
    """
    leader = np.arange(n)
    perm = rng.permutation(n)
    pos, stop = 0, int(0.06 * n)
    while pos < stop:
        size = int(rng.integers(2, 6))
        group = perm[pos:pos + size]
        leader[group] = group.min()
        pos += size
    return leader


class Drift:
    """Per-sample logit scales that drift with the epoch, so rankings change between stages.

    scale_i(e) = exp(a_i + b_i e); with b_i of either sign some samples' entropies fall while
    others' rise, and samples dropped with a stale score re-enter the window or the kept set.
    """

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.rand(n, generator=g) * 3.0 - 1.5
        self.b = torch.randn(n, generator=g) * 0.25
        self.g = g

    def logits(self, epoch, indices, num_classes, leader):
        """float32 [len(indices), C]: random logits per (sample, epoch), tied within groups."""
        n = self.a.numel()
        z = torch.randn(n, num_classes, generator=self.g)  # every sample, so ties are by copy
        z = z * torch.exp(self.a + self.b * epoch)[:, None]
        z = z[torch.from_numpy(leader)]
        return z[indices].contiguous()


def bits(x):
    """float32 tensor or array -> its int32 bit patterns (numpy), for bit-equal checks."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32).view(np.int32)


def run_both(n, rho, stages, stage_epochs, *, seed, num_classes=4, image_shape=(4, 4, 3),
             batch=65536):
    """Run kcd_fast's official protocol and the emulation together, checking every epoch.

    Returns statistics of the run: condensation epochs, kept counts, pairs, empty windows,
    re-entries and the number of exactly tied scores seen.
    """
    epochs = stages * stage_epochs
    rng = np.random.default_rng(seed)
    leader = make_tie_groups(n, rng)
    drift = Drift(n, seed + 1)
    images = rng.integers(0, 256, size=(n,) + image_shape, dtype=np.uint8)
    images_kcd = torch.from_numpy(images.copy())
    images_emu = images.copy()

    cond = kcd_fast.KnowledgeCondenser(n, epochs=epochs, stage_epochs=stage_epochs, rho=rho,
                                       protocol="official")
    emu = OfficialEmulation(n, rho, epochs, stage_epochs)
    ever_dropped = np.zeros(n, dtype=bool)
    stats = dict(plan_epochs=[], kept=[], pairs=[], empty_windows=0, warnings=0,
                 readmitted=0, window_from_dropped=0, ties=0)

    for epoch in range(epochs):
        kept = cond.kept_indices()
        assert kept.dtype == torch.int64
        assert np.array_equal(kept.numpy(), np.sort(emu.kept)), f"kept set differs at epoch {epoch}"
        emu.start_epoch()
        visit = kept[torch.from_numpy(rng.permutation(len(kept)))]   # a shuffled sampler
        logits = drift.logits(epoch, visit, num_classes, leader)
        for lo in range(0, len(visit), batch):
            idx = visit[lo:lo + batch]
            entropy = cond.observe(idx, logits[lo:lo + batch])
            assert entropy.dtype == torch.float32 and entropy.shape == idx.shape
            emu.visit(idx.numpy(), entropy.numpy().astype(np.float64))

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = cond.end_epoch(epoch)
        empty_warnings = [w for w in caught
                          if issubclass(w.category, RuntimeWarning) and EMPTY_WINDOW in str(w.message)]
        want = emu.end_epoch()

        if want is None:
            assert plan is None, f"unexpected condensation at epoch {epoch}"
            assert not empty_warnings
            continue
        assert plan is not None, f"no condensation at epoch {epoch} ((epoch + 1) % T == 0)"
        assert (epoch + 1) % stage_epochs == 0
        stats["plan_epochs"].append(epoch)
        stats["kept"].append(want["num_kept"])
        num_pairs = len(want["k1l"])
        stats["pairs"].append(num_pairs)

        score = want["score"]
        stats["ties"] += int(len(score) - len(np.unique(score)))

        assert np.array_equal(plan.order.cpu().numpy(), want["order"]), f"ranking differs at epoch {epoch}"
        assert np.array_equal(plan.keep.cpu().numpy(), want["keep"]), f"K1 differs at epoch {epoch}"
        assert int(plan.num_kept) == want["num_kept"]
        assert plan.k1l.dtype == torch.int64 and plan.k0.dtype == torch.int64
        assert np.array_equal(plan.k1l.cpu().numpy(), want["k1l"]), f"K1L differs at epoch {epoch}"
        assert np.array_equal(plan.k0.cpu().numpy(), want["k0"]), f"K0 differs at epoch {epoch}"
        assert plan.eps.dtype == torch.float32
        assert np.array_equal(bits(plan.eps), bits(want["eps"])), f"eps differs at epoch {epoch}"

        if num_pairs == 0:
            # The official code raises IndexError here; kcd_fast makes no pairs and warns.
            stats["empty_windows"] += 1
            stats["warnings"] += len(empty_warnings)
        else:
            assert not empty_warnings, f"empty-window warning with {num_pairs} pairs"
            official.mix_pixels_(images_kcd, plan.k1l, plan.k0, plan.eps)
            emulated_mix(images_emu, want["k1l"], want["k0"], want["r"], want["eps"])
        assert np.array_equal(images_kcd.numpy(), images_emu), f"mixed pixels differ at epoch {epoch}"

        # Re-entry: a sample dropped at an earlier condensation that comes back into K1 (readmitted)
        # or into the K0 window without having been kept before (a stale partner).
        stats["readmitted"] += int((want["keep"] & ~want["previous"] & ever_dropped).sum())
        stats["window_from_dropped"] += int((~want["previous"][want["k0"]]).sum())
        ever_dropped |= want["previous"] & ~want["keep"]

    assert np.array_equal(cond.kept_indices().numpy(), np.sort(emu.kept))
    return stats


def expected_kept(n, rho, stages):
    counts, pre = [], n
    for _ in range(stages):
        pre, _ = emulated_counts(n, rho, pre)
        counts.append(pre)
    return counts


# ------------------------------------------------------------------------------------------------
# Whole runs
# ------------------------------------------------------------------------------------------------

RHOS = [0.3, 0.5, 0.7, 0.9]


IMAGENET_N = 1_281_167


@pytest.mark.parametrize("rho", RHOS)
@pytest.mark.parametrize("n", [1000, 50000, pytest.param(IMAGENET_N, marks=pytest.mark.slow)])
@pytest.mark.parametrize("stages, stage_epochs", [(6, 2), (24, 1)])
def test_official_run_matches_emulation(n, rho, stages, stage_epochs):
    """Condensation epochs, ranking, K1, K1L/K0 pairs, eps and mixed pixels all equal the emulation.

    At ImageNet size (N = 1,281,167) the logits have 2 classes and the images 2x2x3 pixels, so the
    run fits in memory and time; the selection and the mixing are the same code at any size."""
    small = dict(num_classes=2, image_shape=(2, 2, 3), batch=1 << 20) if n == IMAGENET_N else {}
    stats = run_both(n, rho, stages, stage_epochs, seed=1000 * stages + int(100 * rho) + n % 997,
                     **small)

    assert stats["plan_epochs"] == [t * stage_epochs - 1 for t in range(1, stages + 1)]
    assert stats["kept"] == expected_kept(n, rho, stages)
    assert stats["ties"] > 0                              # the tie rule was exercised
    assert stats["window_from_dropped"] > 0               # stale partners from earlier drops
    if stages == 6:
        assert stats["empty_windows"] == 0
        assert all(p > 0 for p in stats["pairs"])
    else:
        # 24 stages reach the floor int(rho N): every later condensation has an empty window.
        floor = int(rho * n)
        at_floor = stats["kept"].index(floor)
        assert stats["empty_windows"] == stages - 1 - at_floor > 0
        assert stats["pairs"][at_floor + 1:] == [0] * (stages - 1 - at_floor)
        assert 1 <= stats["warnings"] <= stats["empty_windows"]
        assert stats["readmitted"] > 0                    # dropped samples came back into K1


@pytest.mark.slow
def test_official_run_imagenet_size_counts():
    """N = 1,281,167, counts worked by hand: rho 0.7 over 6 stages drops 64,058 a stage and keeps
    896,819, above the floor; rho 0.5 over 8 stages makes a partial window of 6 onto the floor
    640,583, then an empty one."""
    assert expected_kept(IMAGENET_N, 0.7, 6)[-1] == 896819
    assert expected_kept(IMAGENET_N, 0.7, 6)[0] == IMAGENET_N - 64058
    stats = run_both(IMAGENET_N, 0.5, 8, 1, seed=3, num_classes=2, image_shape=(2, 2, 3),
                     batch=1 << 20)
    assert stats["kept"] == expected_kept(IMAGENET_N, 0.5, 8)
    assert stats["kept"][-2:] == [640583, 640583] and stats["pairs"][-2:] == [6, 0]
    assert stats["empty_windows"] == 1 and stats["warnings"] == 1


def test_empty_window_warns_and_makes_no_pairs():
    """Once the count is at the floor, a condensation has no pairs, warns, and leaves pixels alone."""
    n, rho = 600, 0.5                                     # d = 50, f = 300: floor after 6
    cond = kcd_fast.KnowledgeCondenser(n, epochs=8, stage_epochs=1, rho=rho, protocol="official")
    g = torch.Generator().manual_seed(0)
    plans = []
    for epoch in range(8):
        idx = cond.kept_indices()
        cond.observe(idx, torch.randn(len(idx), 5, generator=g))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plans.append(cond.end_epoch(epoch))
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if epoch < 6:
            assert not any(EMPTY_WINDOW in m for m in messages)
        elif epoch == 6:
            assert any(EMPTY_WINDOW in m for m in messages)
    assert [p.num_kept for p in plans] == [550, 500, 450, 400, 350, 300, 300, 300]
    for p in plans[6:]:
        assert p.k1l.numel() == 0 and p.k0.numel() == 0 and p.eps.numel() == 0
        assert int(p.keep.sum()) == 300
    images = torch.randint(0, 256, (n, 2, 2, 3), dtype=torch.uint8, generator=g)
    before = images.clone()
    official.mix_pixels_(images, plans[6].k1l, plans[6].k0, plans[6].eps)
    assert torch.equal(images, before)


def test_revisit_last_write_wins():
    """Two visits of a sample in one epoch: the record holds the last one, as the official buffer."""
    n, rho = 300, 0.7
    cond = kcd_fast.KnowledgeCondenser(n, epochs=4, stage_epochs=2, rho=rho, protocol="official")
    emu = OfficialEmulation(n, rho, 4, 2)
    g = torch.Generator().manual_seed(5)
    for epoch in range(4):
        emu.start_epoch()
        kept = cond.kept_indices()
        again = kept[torch.randperm(len(kept), generator=g)[: len(kept) // 3]]
        for idx in (kept, again):
            h = cond.observe(idx, torch.randn(len(idx), 6, generator=g) * 2.0)
            emu.visit(idx.numpy(), h.numpy().astype(np.float64))
        plan, want = cond.end_epoch(epoch), emu.end_epoch()
        if want is not None:
            assert np.array_equal(plan.order.numpy(), want["order"])
            assert np.array_equal(plan.keep.numpy(), want["keep"])


# ------------------------------------------------------------------------------------------------
# The pieces
# ------------------------------------------------------------------------------------------------

def test_kept_count_schedule():
    """k_new = max(pre - int(N (1 - rho) / 6), int(rho N)), with the official's numbers."""
    def chain(n, rho, steps):
        out, pre = [], n
        for _ in range(steps):
            pre = official.kept_count(n, rho, pre)
            out.append(pre)
        return out

    assert chain(50000, 0.7, 7) == [47500, 45000, 42500, 40000, 37500, 35000, 35000]
    assert chain(50000, 0.5, 6) == [45834, 41668, 37502, 33336, 29170, 25004]
    assert chain(50000, 0.5, 8)[6:] == [25000, 25000]
    assert chain(50000, 0.9, 7)[-2:] == [45002, 45000]
    assert chain(50000, 0.3, 7)[0] == 44167 and chain(50000, 0.3, 7)[-2:] == [15002, 15000]
    for n in [1, 5, 7, 1000, 50000, 1_281_167]:
        for rho in RHOS + [0.1, 0.95]:
            for pre in sorted({n, n - 1, int(rho * n) + 3, int(rho * n)}):
                if pre >= int(rho * n):
                    assert official.kept_count(n, rho, pre) == emulated_counts(n, rho, pre)[0]


def test_condenser_num_kept_and_cost():
    """num_kept(t) (|K1| chosen at condensation t, 0-based) follows the official counts; C is the
    mean kept fraction over the trained-on stages: all of N, then every set but the last (87.5 %)."""
    cond = kcd_fast.KnowledgeCondenser(50000, epochs=240, stage_epochs=40, rho=0.7, protocol="official")
    assert cond.predicted_cost()["schedule"] == pytest.approx(0.875, abs=1e-12)
    assert [cond.num_kept(t) for t in range(6)] == [47500, 45000, 42500, 40000, 37500, 35000]
    cond = kcd_fast.KnowledgeCondenser(50000, epochs=60, stage_epochs=10, rho=0.5, protocol="official")
    assert cond.num_kept(5) == 25004
    for n, rho, stages in [(50000, 0.5, 6), (1000, 0.3, 24), (1_281_167, 0.9, 6)]:
        cond = kcd_fast.KnowledgeCondenser(n, epochs=stages * 2, stage_epochs=2, rho=rho,
                                           protocol="official")
        kept = expected_kept(n, rho, stages)
        assert [cond.num_kept(t) for t in range(stages)] == kept
        trained = [n] + kept[:-1]                         # the last set is never trained on
        assert cond.predicted_cost()["schedule"] == pytest.approx(sum(trained) / (stages * n), rel=1e-12)


@pytest.mark.parametrize("num_pairs", [1, 2, 3, 4, 7, 10, 64, 2500, 9999, 213527])
def test_pair_eps_bit_equal(num_pairs):
    r, eps = emulated_eps(num_pairs)
    got = official.pair_eps(num_pairs)
    assert got.dtype == torch.float32 and got.shape == (num_pairs,)
    assert np.array_equal(bits(got), bits(eps))
    assert eps[0] == 0.0 and np.all(eps < np.float32(0.3))
    assert np.array_equal(bits(np.float32(1.0) - eps), bits(r))   # r_j == 1 - eps_j in float32
    assert np.all(np.abs(eps.astype(np.float64) - 0.3 * np.arange(num_pairs) / num_pairs) < 1e-6)


def test_pair_eps_empty():
    assert official.pair_eps(0).numel() == 0


@pytest.mark.parametrize("shape", [(4, 4, 3), (32, 32, 3), (7,)])
def test_mix_pixels_matches_emulation(shape):
    """In-place float32 mix with truncation toward zero, both sides read before the write."""
    rng = np.random.default_rng(11)
    n, num_pairs = 3000, 700
    images = rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)
    images[:50] = 255                                     # the top of the range: 255.00002 -> 255
    perm = 50 + rng.permutation(n - 50)                   # disjoint dst and src, no repeats
    dst = np.concatenate([np.arange(25), perm[:num_pairs - 25]])
    src = np.concatenate([np.arange(25, 50), perm[num_pairs - 25:2 * num_pairs - 50]])
    r, eps = emulated_eps(num_pairs)
    got = torch.from_numpy(images.copy())
    official.mix_pixels_(got, torch.from_numpy(dst), torch.from_numpy(src), torch.from_numpy(eps))
    want = images.copy()
    emulated_mix(want, dst, src, r, eps)
    assert np.array_equal(got.numpy(), want)
    untouched = np.setdiff1d(np.arange(n), dst)
    assert np.array_equal(got.numpy()[untouched], images[untouched])
    # Rounding instead of truncation would differ here, so the check above decides between them.
    shape1 = (-1,) + (1,) * len(shape)
    m = images[dst].astype(np.float32) * r.reshape(shape1) + images[src].astype(np.float32) * eps.reshape(shape1)
    assert np.any(np.rint(m).astype(np.uint8) != want[dst])


def test_mix_pixels_compounds():
    """A row mixed at one stage is mixed again from its mixed pixels at the next."""
    rng = np.random.default_rng(12)
    images = rng.integers(0, 256, size=(40, 3, 3, 3), dtype=np.uint8)
    got = torch.from_numpy(images.copy())
    want = images.copy()
    for dst, src in [(np.arange(0, 10), np.arange(10, 20)), (np.arange(5, 15), np.arange(20, 30)),
                     (np.arange(20, 26), np.arange(0, 6))]:
        r, eps = emulated_eps(len(dst))
        official.mix_pixels_(got, torch.from_numpy(dst), torch.from_numpy(src), torch.from_numpy(eps))
        emulated_mix(want, dst, src, r, eps)
        assert np.array_equal(got.numpy(), want)


def window_partition(order, n_keep, previous_keep):
    """Emulated official window: K1 = order[:k], K0 = order[k:pre], K1L = order[k - L:k]."""
    pre = int(previous_keep.sum()) if previous_keep is not None else len(order)
    num_pairs = max(pre - n_keep, 0)
    keep = np.zeros(len(order), dtype=bool)
    keep[order[:n_keep]] = True
    return keep, order[n_keep - num_pairs:n_keep], order[n_keep:n_keep + num_pairs]


@pytest.mark.parametrize("seed", range(6))
def test_condense_window_matches_reference(seed):
    """ops.condense(k0="window") == reference.partition(k0="window") == the emulated window,
    with previous_keep masks that are not the top of the new ranking (re-entering points)."""
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(50, 4000))
    values = torch.from_numpy(rng.random(n).astype(np.float32))
    counts = torch.from_numpy(rng.integers(1, 5, n).astype(np.int32))
    outside_window = outside_kept = 0
    for case in range(8):
        order = rng.permutation(n)
        pre = int(rng.integers(n // 2, n + 1))
        if case == 0:
            previous = None
            pre = n
        else:
            # previous kept set: mostly the top of this order, with some points swapped out so
            # that points outside it rank inside the window or inside the new K1.
            previous = np.zeros(n, dtype=bool)
            previous[order[:pre]] = True
            swap = int(rng.integers(1, max(2, min(pre, n - pre) // 2 + 1))) if pre < n else 0
            if swap:
                out = rng.choice(order[:pre], swap, replace=False)
                back = rng.choice(order[pre:], swap, replace=False)
                previous[out] = False
                previous[back] = True
        k_new = int(rng.integers(max(1, (pre + 1) // 2), pre + 1))
        order_t = torch.from_numpy(order.astype(np.int64))
        prev_t = None if previous is None else torch.from_numpy(previous)

        keep, k1l, k0 = window_partition(order, k_new, previous)
        part = reference.partition(order_t, k_new, prev_t, k0="window")
        plan = ops.condense(values, counts, keep=k_new, alpha=0.03, eps_max=0.3, previous_keep=prev_t,
                            k0="window", order=order_t)
        for name, got in [("reference", part), ("ops", plan)]:
            assert np.array_equal(got.keep.cpu().numpy(), keep), name
            assert np.array_equal(got.k1l.cpu().numpy(), k1l), name
            assert np.array_equal(got.k0.cpu().numpy(), k0), name
            assert int(got.num_k0) == len(k0), name
        assert int(plan.num_kept) == k_new
        assert np.array_equal(plan.order.cpu().numpy(), order)
        if previous is not None:
            outside_window += int((~previous[k0]).sum())
            outside_kept += int((keep & ~previous).sum())
    assert outside_window > 0 and outside_kept > 0        # re-entering points were exercised


def test_condense_window_reentry_example():
    """A hand-made case: the window holds a point that was not kept before, and a point kept
    before that now ranks below the window is not a partner."""
    order = torch.tensor([3, 0, 5, 1, 4, 2, 6, 7], dtype=torch.int64)
    previous = torch.tensor([True, True, False, True, True, True, False, True])   # 6 kept; 5 was not
    # k = 3, pre = 6: K1 = {3, 0, 5}, K0 = positions 3..5 = [1, 4, 2], K1L = [3, 0, 5]; 7 (kept
    # before, ranked 7th) is not a partner; 5 (dropped before) is re-admitted.
    for got in (reference.partition(order, 3, previous, k0="window"),
                ops.condense(torch.zeros(8), torch.ones(8, dtype=torch.int32), keep=3, alpha=0.03,
                             eps_max=0.3, previous_keep=previous, k0="window", order=order)):
        assert got.keep.tolist() == [True, False, False, True, False, True, False, False]
        assert got.k1l.tolist() == [3, 0, 5]
        assert got.k0.tolist() == [1, 4, 2]


# ------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------

def test_official_refuses_other_policies():
    with pytest.raises(ValueError):
        kcd_fast.KnowledgeCondenser(1000, epochs=12, stage_epochs=2, protocol="official", k0="all")
    with pytest.raises(ValueError):
        kcd_fast.KnowledgeCondenser(1000, epochs=12, stage_epochs=2, protocol="official", schedule="linear")
    with pytest.raises(ValueError):
        kcd_fast.KnowledgeCondenser(1000, epochs=12, stage_epochs=2, protocol="nope")
