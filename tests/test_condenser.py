"""KnowledgeCondenser: the stage loop against a transcription of Alg. 1, cost, resume, DDP, VAKS, ablations."""
import io
from pathlib import Path
import math

import pytest
import torch

import kcd_fast
from kcd_fast import KCDDataset, KnowledgeCondenser
from kcd_fast import reference as R
from kcd_fast.data import InMemoryImageDataset


class Synthetic:
    """Deterministic student logits per (index, epoch): samples grow confident at their own rates."""

    def __init__(self, n, c=10, seed=0, levels=None):
        g = torch.Generator().manual_seed(seed)
        self.base = torch.randn(n, c, generator=g)
        self.rate = torch.rand(n, generator=g)
        self.levels = levels

    def __call__(self, idx, epoch):
        logits = self.base[idx] * (0.5 + 0.4 * epoch * self.rate[idx])[:, None]
        if self.levels:  # few distinct rows: many exact ties in the values
            logits = self.base[idx % self.levels]
        return logits


def run_epochs(cond, synth, epochs, batch=64, start=0):
    """Train-loop stand-in: sample, observe, end the epoch. Returns the plans and per-epoch sample counts."""
    plans, sampled = {}, []
    sampler = cond.sampler(batch_size=batch)
    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        n = 0
        for b in sampler:
            idx = torch.tensor(b)
            cond.observe(idx, synth(idx, epoch))
            n += len(b)
        sampled.append(n)
        plan = cond.end_epoch(epoch)
        if plan is not None:
            plans[epoch] = plan
    return plans, sampled


@pytest.mark.parametrize("schedule", ["exp", "linear"])
@pytest.mark.parametrize("policy", ["dropped", "all"])
def test_simulated_run_matches_alg1_transcription(schedule, policy):
    n, epochs, stage = 1500, 12, 3
    synth = Synthetic(n, seed=1)
    cond = KnowledgeCondenser(n, epochs=epochs, stage_epochs=stage, rho=0.6, schedule=schedule, k0=policy)
    drawn = {}
    sampler = cond.sampler(batch_size=50)
    values = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.int64)
    keep = torch.ones(n, dtype=torch.bool)
    s = epochs // stage
    for i in range(epochs):
        sampler.set_epoch(i)
        batches = list(sampler)
        drawn[i] = sum(len(b) for b in batches)
        flat = torch.tensor([j for b in batches for j in b])
        assert torch.equal(flat.sort().values, keep.nonzero().flatten()), "the sampler must draw exactly K^"
        for b in batches:
            idx = torch.tensor(b)
            logits = synth(idx, i)
            cond.observe(idx, logits)
            values, counts = R.record_values(values, counts, idx, R.entropy(logits))
        plan = cond.end_epoch(i)
        if i % stage != 0:
            assert plan is None
            continue
        # Eq. 12: the recorded state equals the float64 transcription.
        assert torch.equal(cond.counts.long(), counts)
        torch.testing.assert_close(cond.values.double(), values, atol=2e-6, rtol=2e-6)
        # Alg. 1 lines 9-13 with the reference functions, on the condenser's float32 values
        # (float64 vs float32 means may swap near-ties; the stage logic is what is checked here).
        t = i // stage
        n_keep = R.num_kept(n, t, 0.6, s, schedule)
        order = R.rank(cond.values, cond.counts, 0.03)
        part = R.partition(order, n_keep, keep, policy)
        eps = R.vaks_eps(part.k1l.numel(), 0.3)
        assert plan.num_kept == n_keep
        assert torch.equal(plan.keep, part.keep)
        assert torch.equal(plan.k1l, part.k1l) and torch.equal(plan.k0, part.k0)
        torch.testing.assert_close(plan.eps.double(), eps, atol=1e-7, rtol=1e-6)
        assert torch.equal(cond.partner[part.k1l].long(), part.k0)
        keep = part.keep
    # Sampled counts per epoch: N in epoch 0, then |K1| of the stage in force.
    expected = [n] + [R.num_kept(n, (e - 1) // stage, 0.6, s, schedule) for e in range(1, epochs)]
    assert [drawn[i] for i in range(epochs)] == expected
    assert cond.measured_cost()["per_epoch"] == {i: expected[i] for i in range(epochs)}
    assert cond.measured_cost()["C"] == pytest.approx(cond.predicted_cost()["schedule"], abs=1e-12)


def test_measured_cost_is_one_for_the_full_set_on_any_number_of_ranks():
    """C = C_a / (ceil(N / W) W epochs): what DistributedSampler passes on W ranks (it pads N to a
    multiple of W) is exactly 1, so the KD baseline's C is 1 however many ranks run it."""
    from torch.utils.data import DistributedSampler

    from kcd_fast.condenser import measured_cost

    for n in (1, 7, 10, 1000):
        for world in (1, 2, 3, 8):
            epochs = 3
            passed = sum(len(DistributedSampler(range(n), num_replicas=world, rank=r)) for r in range(world)) * epochs
            assert measured_cost(passed, n, epochs, world) == 1.0, (n, world)
    assert measured_cost(700, 1000, 1) == 0.7
    assert measured_cost(12, 10, 1, world_size=4) == 1.0  # ceil(10 / 4) * 4 = 12
    assert math.isnan(measured_cost(0, 10, 0))
    for args, exc, match in [((-1, 10, 1), ValueError, "samples_passed"), ((5, 0, 1), ValueError, "num_samples"),
                             ((5, 10, 1.0), TypeError, "epochs"), ((5, 10, 1, 0), ValueError, "world_size")]:
        with pytest.raises(exc, match=f"measured_cost: `{match}`"):
            measured_cost(*args)
    # The condenser's own C is this function of what its samplers yielded.
    cond = KnowledgeCondenser(10, epochs=2, stage_epochs=1, rho=0.5)
    run_epochs(cond, Synthetic(10), 2)
    m = cond.measured_cost()
    assert m["C"] == measured_cost(m["C_a"], 10, 2)


def test_ties_are_broken_by_index_through_the_loop():
    n = 400
    cond = KnowledgeCondenser(n, epochs=2, stage_epochs=1, rho=0.5)
    synth = Synthetic(n, seed=2, levels=3)
    plans, _ = run_epochs(cond, synth, 1)
    order = R.rank(cond.values, cond.counts, 0.03)
    assert torch.equal(plans[0].order, order)
    assert len(set(cond.values.tolist())) == 3


def test_cost_matches_eq16():
    cond = KnowledgeCondenser(1000, epochs=240, stage_epochs=40, rho=0.7)
    pred = cond.predicted_cost()
    assert pred["eq16"] == pytest.approx(0.8164, abs=1e-4)
    # The exact schedule: epoch 0 full, then |K1| of stage t from the end of epoch 40 t on
    # (so the last stage, at rho, runs T - 1 epochs).
    kept = [R.num_kept(1000, t, 0.7, 6) for t in range(6)]
    assert kept == [942, 887, 836, 788, 742, 700]
    assert pred["schedule"] == pytest.approx((1000 + 40 * sum(kept[:5]) + 39 * kept[5]) / (1000 * 240), abs=1e-12)
    sampler = cond.sampler()
    for epoch in range(240):
        sampler.set_epoch(epoch)
        for _ in sampler:
            pass
        cond.end_epoch(epoch)
    m = cond.measured_cost()
    assert m["C"] == pytest.approx(pred["schedule"], abs=1e-12)
    assert m["C_a"] == sum(cond.planned_samples(e) for e in range(240))
    assert abs(m["C"] - pred["eq16"]) < 0.002
    taus = [h["tau"] for h in cond.history]
    assert taus[0] == pytest.approx(0.9423, abs=1e-4) and taus[-1] == pytest.approx(0.7)
    assert [h["kept"] for h in cond.history] == [R.num_kept(1000, t, 0.7, 6) for t in range(6)]


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("kill_after", [0, 4, 5])
def test_kill_and_resume_reaches_the_same_plans(kill_after):
    n, epochs, stage = 600, 9, 3
    synth = Synthetic(n, seed=3)
    full = KnowledgeCondenser(n, epochs=epochs, stage_epochs=stage, selection="kcd")
    plans_full, sampled_full = run_epochs(full, synth, epochs)

    first = KnowledgeCondenser(n, epochs=epochs, stage_epochs=stage)
    run_epochs(first, synth, kill_after + 1)
    checkpoint = _roundtrip(first.state_dict())
    # The killed process went on into the next epoch; its partial work is lost.
    sampler = first.sampler(batch_size=64)
    sampler.set_epoch(kill_after + 1)
    for b in list(sampler)[:3]:
        first.observe(torch.tensor(b), synth(torch.tensor(b), kill_after + 1))

    resumed = KnowledgeCondenser(n, epochs=epochs, stage_epochs=stage)
    resumed.load_state_dict(checkpoint)
    plans_res, _ = run_epochs(resumed, synth, epochs, start=kill_after + 1)
    for e, plan in plans_res.items():
        for name in ("keep", "order", "k1l", "k0", "eps"):
            assert torch.equal(getattr(plan, name), getattr(plans_full[e], name)), (e, name)
    assert torch.equal(resumed.values, full.values) and torch.equal(resumed.counts, full.counts)
    assert resumed.measured_cost() == full.measured_cost()
    assert [h["kept"] for h in resumed.history] == [h["kept"] for h in full.history]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [None, 7])
def test_sampler_under_simulated_ddp(world_size, batch_size):
    n = 103
    cond = KnowledgeCondenser(n, epochs=4, stage_epochs=1, rho=0.5)
    cond.end_epoch(0)  # condense to 0.84 N: an odd kept count
    kept = set(cond.kept_indices().tolist())
    rng = torch.get_rng_state()
    samplers = [cond.sampler(batch_size=batch_size, rank=r, world_size=world_size) for r in range(world_size)]
    for s in samplers:
        s.set_epoch(3)
    draws = [list(s) for s in samplers]
    assert torch.equal(torch.get_rng_state(), rng), "the sampler touched the global RNG"
    lengths = {len(d) for d in draws}
    assert len(lengths) == 1 and lengths.pop() == len(samplers[0]), "ranks step different numbers of batches"
    flat = [[i for b in d for i in b] if batch_size else d for d in draws]
    union = set().union(*map(set, flat))
    assert union == kept
    total = sum(len(f) for f in flat)
    assert total - len(kept) < world_size  # padding only
    if world_size > 1:
        for a in range(world_size):
            for b in range(a + 1, world_size):
                assert len(set(flat[a]) & set(flat[b])) <= total - len(kept)
    again = cond.sampler(batch_size=batch_size, rank=0, world_size=world_size)
    again.set_epoch(3)
    assert list(again) == draws[0]
    again.set_epoch(4)
    assert list(again) != draws[0]


def test_sampler_drop_last():
    cond = KnowledgeCondenser(10, epochs=1, stage_epochs=1)
    s = cond.sampler(batch_size=4, drop_last=True, shuffle=False)
    assert len(s) == 2 and [len(b) for b in s] == [4, 4]
    d = cond.sampler(drop_last=True, rank=1, world_size=3, shuffle=False)
    assert len(d) == 3 and len(list(d)) == 3


def _ddp_worker(rank, world_size, init_file, out_dir, n, epochs, stage, run_until, ovr=True):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    cond = KnowledgeCondenser(n, epochs=epochs, stage_epochs=stage, online_recording=ovr)
    assert cond.world_size == world_size and cond.rank == rank
    plans, sampled = run_epochs(cond, Synthetic(n, seed=4), run_until, batch=16)
    torch.save({"values": cond.values, "counts": cond.counts, "keep": cond.keep, "partner": cond.partner,
                "last_values": cond.last_values, "sampled": sampled, "C": cond.measured_cost()["C"]},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("ovr", [True, False])
def test_real_two_process_gloo_merge_equals_single_process(tmp_path, ovr):
    # Boundaries at the ends of epochs 0 and 2. w/o OVR, one epoch a stage: the ranks' last visits of a
    # stage are then of one epoch (the sampler's padding repeat, visited by both ranks, included).
    n, epochs, stage, run_until = (301, 4, 2, 3) if ovr else (301, 3, 1, 3)
    torch.multiprocessing.spawn(_ddp_worker, nprocs=2, join=True,
                                args=(2, str(tmp_path / "init"), str(tmp_path), n, epochs, stage, run_until, ovr))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # One process observing the union of both ranks' batches, epoch by epoch.
    synth = Synthetic(n, seed=4)
    single = KnowledgeCondenser(n, epochs=epochs, stage_epochs=stage, online_recording=ovr)
    samplers = [single.sampler(batch_size=16, rank=r, world_size=2) for r in range(2)]
    for epoch in range(run_until):
        for s in samplers:
            s.set_epoch(epoch)
            for b in s:
                idx = torch.tensor(b)
                single.observe(idx, synth(idx, epoch))
        single.end_epoch(epoch)
    for r in ranks:
        assert torch.equal(r["counts"], single.counts)
        torch.testing.assert_close(r["values"], single.values, atol=1e-6, rtol=1e-6)
        assert torch.equal(r["keep"], single.keep) and torch.equal(r["partner"], single.partner)
        assert r["C"] == pytest.approx(single.measured_cost()["C"], abs=2 / n)
        if not ovr:
            torch.testing.assert_close(r["last_values"], single.last_values, atol=1e-6, rtol=1e-6)
    assert ranks[0]["sampled"] == ranks[1]["sampled"]


def _flag_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    from kcd_fast import ops

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cond = KnowledgeCondenser(20, epochs=2, stage_epochs=1)
    if rank == 1:  # as the CUDA kernel does when it skips an index outside [0, N)
        ops._error_flags[torch.device("cpu")] = torch.ones(1, dtype=torch.int32)
    try:
        cond.end_epoch(0)
        outcome = "no error"
    except ValueError as exc:
        outcome = str(exc)
    Path(out_dir, f"rank{rank}.txt").write_text(f"{outcome}|{cond.next_epoch}")
    dist.destroy_process_group()


def test_an_out_of_range_index_on_one_rank_stops_every_rank(tmp_path):
    """The CUDA kernel only flags a bad index; a rank raising alone at the stage end would leave the
    others waiting in the merge's all_reduce until the timeout. The flag travels in that all_reduce."""
    torch.multiprocessing.spawn(_flag_worker, nprocs=2, join=True, args=(str(tmp_path / "init"), str(tmp_path)))
    r0, r1 = (Path(tmp_path, f"rank{r}.txt").read_text().split("|") for r in range(2))
    assert "outside [0, N) on another rank" in r0[0]
    assert "outside [0, N) on cpu" in r1[0]
    assert r0[1] == r1[1] == "0", "the epoch stays open on every rank"


def test_dataset_wrapper_mixes_like_vaks_mix():
    n = 60
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 4, 4), generator=g, dtype=torch.uint8)
    targets = torch.arange(n) % 3
    base = InMemoryImageDataset(images, targets, transform=lambda img: img.float() / 255.0)
    cond = KnowledgeCondenser(n, epochs=2, stage_epochs=1, rho=0.5)
    synth = Synthetic(n, seed=5)
    run_epochs(cond, synth, 1)
    k1l, k0, eps = cond.pairs
    assert k1l.numel() > 0
    ds = KCDDataset(base, cond)
    buffer = images.float() / 255.0
    kcd_fast.vaks_mix_(buffer, k1l, k0, eps)
    for i in range(n):
        x, y, index = ds[i]
        assert index == i and y == int(targets[i])
        torch.testing.assert_close(x.reshape(4, 4) if x.dim() == 3 else x, buffer[i], atol=1e-6, rtol=1e-6)
    plain = KCDDataset(base, cond, mix=False)
    j = int(k1l[-1])
    torch.testing.assert_close(plain[j][0], base[j][0])
    # Persistent mixing of the in-memory pixels, as the official code does.
    pixels = images.clone()
    cond.mix_buffer_(pixels)
    expected = images.clone()
    kcd_fast.vaks_mix_(expected, k1l, k0, eps)
    assert torch.equal(pixels, expected)


def _plan_of(epochs=3, **kwargs):
    n = 500
    cond = KnowledgeCondenser(n, epochs=4, stage_epochs=2, rho=0.6, **kwargs)
    plans, _ = run_epochs(cond, Synthetic(n, seed=6), epochs)
    return cond, plans


def _same(a, b, names):
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in names)


def test_ablations_change_only_what_they_should():
    base1, b1 = _plan_of(epochs=1)
    base, b = _plan_of()
    everything = ("keep", "order", "k1l", "k0", "eps")
    for kwargs in (dict(selection="random"), dict(online_recording=False), dict(alpha=0.0), dict(vaks=False),
                   dict(adaptive_eps=False)):
        cond, q = _plan_of(epochs=1, **kwargs)
        # The recording (Eq. 12) never changes: after one epoch the state is the same.
        assert torch.equal(cond.values, base1.values) and torch.equal(cond.counts, base1.counts), kwargs
        assert q[0].num_kept == b1[0].num_kept and q[0].num_k0 == b1[0].num_k0, kwargs

    # OGVE w/ random: a seeded random ranking instead of Eq. 13.
    _, q = _plan_of(selection="random")
    _, q2 = _plan_of(selection="random")
    assert not torch.equal(q[0].keep, b[0].keep) and _same(q[0], q2[0], everything) and _same(q[2], q2[2], everything)
    # w/o OVR: after one visit the last entropy is the mean (same plan); later it ranks by the last visit.
    last, q = _plan_of(online_recording=False)
    assert _same(q[0], b[0], everything) and not torch.equal(q[2].keep, b[2].keep)
    seen = b[0].keep  # the points trained on in epochs 1 and 2
    ent = R.entropy(Synthetic(500, seed=6)(torch.arange(500), 2)).float()
    torch.testing.assert_close(last.last_values[seen], ent[seen], atol=1e-5, rtol=1e-5)
    # w/o CAR (alpha = 0): all counts are 1 at stage 0 (same plan); then it ranks by value alone.
    nocar, q = _plan_of(alpha=0.0)
    assert _same(q[0], b[0], everything) and not torch.equal(q[2].order, b[2].order)
    assert torch.equal(q[2].order, R.rank(nocar.values, nocar.counts, 0.0))
    # Direct selection (no VAKS): the same K1, no pairs.
    novaks, q = _plan_of(vaks=False)
    for e in (0, 2):
        assert _same(q[e], b[e], ("keep", "order")) and q[e].k1l.numel() == 0
    assert (novaks.partner == -1).all() and b[2].k1l.numel() > 0
    # Non-adaptive augmentation: the same pairs, eps = eps_m.
    _, q = _plan_of(adaptive_eps=False)
    for e in (0, 2):
        assert _same(q[e], b[e], ("keep", "order", "k1l", "k0")) and torch.all(q[e].eps == torch.tensor(0.3))


def test_random_selection_draws_a_new_ranking_each_stage():
    """OGVE w/ random: each stage ranks by a fresh seeded permutation, not the first one again."""
    _, q = _plan_of(selection="random")
    assert not torch.equal(q[0].order, q[2].order)
    for plan in (q[0], q[2]):  # a permutation of every point, not a ranking by value
        assert torch.equal(plan.order.sort().values, torch.arange(500))


def test_stage_history_holds_the_rank_likelihoods_of_the_tracked_points():
    """Eq. 8's p_R(y; x) = 1 - R_V(x)/N of the tracked points, from the stage's own ranking (Fig. 3(b))."""
    cond, plans = _plan_of()
    for entry, epoch in zip(cond.history, sorted(plans)):
        expected = R.rank_likelihood(plans[epoch].order)[cond.trajectory_points]
        assert entry["rank_likelihood"] == expected.tolist()


def _stage_stats_twin(values, keep, order, tracked, q, bins):
    """The slow twin of stage_stats.stage_value_stats: one host read per statistic, torch.quantile and
    torch.histc on the CPU, in float64."""
    v, keep = values.double().cpu(), keep.cpu()
    n = v.numel()
    kept, dropped = v[keep], v[~keep]
    hi = max(float(v.max()), 1e-6)
    qs = torch.tensor(q, dtype=torch.float64)
    position = torch.empty(n, dtype=torch.int64)
    position[order.cpu()] = torch.arange(n)
    return {"mean_kept": float(kept.mean()) if kept.numel() else float("nan"),
            "mean_dropped": float(dropped.mean()) if dropped.numel() else float("nan"),
            "quantiles_kept": torch.quantile(kept, qs).tolist() if kept.numel() else [],
            "quantiles_dropped": torch.quantile(dropped, qs).tolist() if dropped.numel() else [],
            "hist": {"edges": [hi * i / bins for i in range(bins + 1)],
                     "kept": torch.histc(kept, bins, 0.0, hi).tolist(),
                     "dropped": torch.histc(dropped, bins, 0.0, hi).tolist()},
            "rank_likelihood": (1.0 - position[tracked].double() / n).tolist()}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("case", ["random", "duplicates_on_edges", "all_kept", "one_dropped", "one_point"])
def test_stage_value_stats_match_their_slow_twin(device, case):
    """summary.json's per-stage value statistics, computed on the device with one read, against
    torch.quantile / torch.histc / masked means on the CPU: odd sizes, repeated values, values on bin
    edges and at the maximum, empty kept or dropped sets."""
    from kcd_fast.stage_stats import stage_value_stats

    g = torch.Generator().manual_seed(len(case))  # a fixed seed per case (str hashes vary per process)
    n = {"one_point": 1, "one_dropped": 7}.get(case, 1237)
    if case == "duplicates_on_edges":  # max 2.0: 0.05 steps are the 40 bins' edges; many ties, zeros (unseen)
        values = (torch.randint(0, 41, (n,), generator=g) * 0.05).float()
        values[:5] = 0.0
        values[5] = 2.0
    else:
        values = torch.rand(n, generator=g) * 3.7
    keep = torch.rand(n, generator=g) < 0.7
    if case in ("all_kept", "one_point"):
        keep[:] = True
    if case == "one_dropped":
        keep[:] = True
        keep[3] = False
    order = torch.randperm(n, generator=g)
    tracked = torch.randperm(n, generator=g)[: min(n, 256)].sort().values
    q, bins = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0), 40
    got = stage_value_stats(values.to(device), keep.to(device), int(keep.sum()), order.to(device), tracked,
                            q=q, bins=bins)
    want = _stage_stats_twin(values, keep, order, tracked, q, bins)
    for key in ("mean_kept", "mean_dropped"):
        if math.isnan(want[key]):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
    for key in ("quantiles_kept", "quantiles_dropped"):
        assert len(got[key]) == len(want[key]) and got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
    assert got["hist"]["edges"] == pytest.approx(want["hist"]["edges"], rel=1e-12, abs=1e-12)
    assert got["hist"]["kept"] == want["hist"]["kept"] and got["hist"]["dropped"] == want["hist"]["dropped"]
    assert sum(got["hist"]["kept"]) == int(keep.sum()) and sum(got["hist"]["dropped"]) == n - int(keep.sum())
    # 1 - position / n in float64: exact positions, but CUDA may round the division differently by an
    # ulp; a position off by one would differ by 1/n >= 1e-4 here
    assert got["rank_likelihood"] == pytest.approx(want["rank_likelihood"], rel=1e-14, abs=1e-15)


def test_end_epoch_past_the_last_epoch_is_refused_and_changes_nothing():
    cond = KnowledgeCondenser(50, epochs=2, stage_epochs=1)
    synth = Synthetic(50)
    run_epochs(cond, synth, 2)
    before = _host_state(cond)
    with pytest.raises(ValueError, match="epoch 2 is past the last epoch \\(1\\)"):
        cond.end_epoch(2)
    _assert_same_state(before, _host_state(cond))


def _last_visit_loop(last, indices, entropy):
    """The slow twin of the w/o OVR record: visit the batch in order; a finite visit in range overwrites."""
    last = last.clone()
    for i, e in zip(indices.tolist(), entropy.tolist()):
        if 0 <= i < last.numel() and math.isfinite(e):
            last[i] = e
    return last


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("seed", range(4))
def test_last_visit_record_is_the_last_finite_visit_with_duplicates(device, seed):
    """w/o OVR with a sampler with replacement: duplicates in a batch. CUDA's index_put_ has no defined
    winner among them; the record must be the last finite visit, the same on every device."""
    from kcd_fast.ops import record_last_visit_
    g = torch.Generator().manual_seed(seed)
    n, b = 37, 301
    last = torch.randn(n, generator=g)
    indices = torch.randint(-3, n + 3, (b,), generator=g)  # duplicates, and a few out of range
    indices[:40] = indices[0]  # one long run
    entropy = torch.rand(b, generator=g)
    entropy[torch.rand(b, generator=g) < 0.3] = float("nan")
    entropy[5] = float("inf")
    entropy[39] = float("nan")  # the long run's last visit is not finite: an earlier one counts
    expected = _last_visit_loop(last, indices, entropy)
    got = last.to(device)
    record_last_visit_(got, indices.to(device, torch.int32), entropy.to(device))
    assert torch.equal(got.cpu(), expected)
    record_last_visit_(got, indices[:0].to(device), entropy[:0].to(device))  # an empty batch: no change
    assert torch.equal(got.cpu(), expected)


def test_observe_without_ovr_records_the_last_visit_of_duplicates():
    cond = KnowledgeCondenser(20, epochs=2, stage_epochs=1, online_recording=False)
    idx = torch.tensor([3, 7, 3, 3, 9, 7])
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    logits[3] = float("nan")  # 3's last visit is not a number: its second one counts
    entropy = cond.observe(idx, logits)
    assert torch.equal(cond.last_values, _last_visit_loop(torch.zeros(20), idx, entropy))
    assert cond.last_values[3] == entropy[2] and cond.last_values[7] == entropy[5]


def test_world_size_needs_a_process_group():
    with pytest.raises(ValueError, match="world_size=2 needs an initialised torch.distributed"):
        KnowledgeCondenser(10, epochs=2, stage_epochs=1, world_size=2, rank=0)


def test_a_condenser_made_before_the_process_group_is_refused_once_it_exists(monkeypatch):
    """Made before init_process_group, it took world_size 1: every rank would run its own KCD."""
    import torch.distributed as dist

    early = KnowledgeCondenser(10, epochs=2, stage_epochs=1)
    explicit = KnowledgeCondenser(10, epochs=2, stage_epochs=1, world_size=1, rank=0)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    for call in (early.sampler, lambda: early.end_epoch(0)):
        with pytest.raises(ValueError, match="made before torch.distributed.init_process_group.*4 ranks"):
            call()
    assert early.next_epoch == 0, "end_epoch refused before closing the epoch"
    explicit.sampler()
    assert explicit.end_epoch(0) is not None  # world_size=1 given: one process's KCD, as asked
    assert early.sampler(rank=0, world_size=1) is not None  # another rank's sampler, named explicitly


def test_bytes_per_sample_reported():
    cond = KnowledgeCondenser(10, epochs=1, stage_epochs=1)
    assert cond.bytes_per_sample() == {"device": 17, "host": 16}


def test_errors():
    ok = dict(epochs=6, stage_epochs=2)
    with pytest.raises(ValueError, match="stage_epochs.*divide"):
        KnowledgeCondenser(10, epochs=6, stage_epochs=4)
    with pytest.raises(ValueError, match="stage_epochs.*exceed"):
        KnowledgeCondenser(10, epochs=6, stage_epochs=8)
    for name in ("rho", "eps_max"):
        for bad in (0.0, 1.5, -0.2):
            with pytest.raises(ValueError, match=name):
                KnowledgeCondenser(10, **ok, **{name: bad})
    with pytest.raises(ValueError, match="schedule"):
        KnowledgeCondenser(10, **ok, schedule="cos")
    with pytest.raises(ValueError, match="num_samples"):
        KnowledgeCondenser(0, **ok)
    cond = KnowledgeCondenser(10, **ok)
    with pytest.raises(ValueError, match=r"dataset has 12 samples.*num_samples=10"):
        KCDDataset(InMemoryImageDataset(torch.zeros(12, 2, 2, dtype=torch.uint8), torch.zeros(12)), cond)
    before = cond.values.clone(), cond.counts.clone()
    with pytest.raises(ValueError, match=r"indices.*\[0, 10\)"):
        cond.observe(torch.tensor([3, 10]), torch.randn(2, 4))
    assert torch.equal(before[0], cond.values) and torch.equal(before[1], cond.counts)
    with pytest.raises(ValueError, match="expected epoch 0"):
        cond.end_epoch(1)
    other = KnowledgeCondenser(11, **ok)
    with pytest.raises(ValueError, match="N=10.*N=11"):
        other.load_state_dict(cond.state_dict())
    state = cond.state_dict()
    state["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        cond.load_state_dict(state)
    changed = KnowledgeCondenser(10, **ok, rho=0.5)
    with pytest.raises(ValueError, match="rho"):
        changed.load_state_dict(cond.state_dict())
    with pytest.raises(ValueError, match="one row per sample"):
        cond.mix_buffer_(torch.zeros(9, 3))


def test_save_and_load_condensed(tmp_path):
    n = 200
    cond, plans = _plan_of()
    path = tmp_path / "condensed.pt"
    cond.save_condensed(path)
    fresh = KnowledgeCondenser(500, epochs=4, stage_epochs=2, rho=0.6)
    plan = fresh.load_condensed(path)
    assert torch.equal(fresh.keep, cond.keep) and torch.equal(fresh.partner, cond.partner)
    assert torch.equal(plan.k1l, cond.pairs[0])
    assert fresh.end_epoch(0) is None and torch.equal(fresh.keep, cond.keep), "frozen: no more condensation"
    # A frozen set resumed from its state_dict still describes itself as its file did.
    resumed = KnowledgeCondenser(500, epochs=4, stage_epochs=2, rho=0.6)
    resumed.load_state_dict(fresh.state_dict())
    resumed.save_condensed(tmp_path / "again.pt")
    for key in ("stage", "tau", "keep", "k1l"):
        again, first = torch.load(tmp_path / "again.pt")[key], torch.load(path)[key]
        assert torch.equal(again, first) if isinstance(first, torch.Tensor) else again == first, key
    assert torch.load(path)["stage"] >= 0
    # Not frozen: the loaded set is kept until the next stage end, across a state_dict round trip.
    unfrozen = KnowledgeCondenser(500, epochs=4, stage_epochs=2, rho=0.6)
    unfrozen.load_condensed(path, freeze=False)
    copy = KnowledgeCondenser(500, epochs=4, stage_epochs=2, rho=0.6)
    copy.load_state_dict(unfrozen.state_dict())
    assert torch.equal(copy.keep, cond.keep)
    with pytest.raises(ValueError, match="N=500.*N=200"):
        KnowledgeCondenser(n, epochs=4, stage_epochs=2).load_condensed(path)
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a file written by save_condensed"):
        fresh.load_condensed(tmp_path / "other.pt")
    assert math.isfinite(cond.history[-1]["mean_value_kept"])


def _to_float(x):
    return x.float()


def test_loader_workers_see_each_new_plan():
    """KCDDataset mixes in persistent loader workers with the pairs of the latest stage."""
    n = 40
    pixels = (torch.arange(n) * 5).to(torch.uint8).repeat_interleave(4).reshape(n, 2, 2)
    base = InMemoryImageDataset(pixels, torch.zeros(n, dtype=torch.int64), transform=_to_float)
    images = pixels.float().unsqueeze(1)
    cond = KnowledgeCondenser(n, epochs=3, stage_epochs=1, rho=0.5)
    loader = torch.utils.data.DataLoader(KCDDataset(base, cond), batch_size=8, sampler=cond.sampler(),
                                         num_workers=2, persistent_workers=True)
    synth = Synthetic(n, seed=7)
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        for x, y, index in loader:
            expected = images[index].clone()
            k1l, k0, eps = cond.pairs
            pos = {int(d): j for j, d in enumerate(k1l)}
            for r, i in enumerate(index.tolist()):
                if i in pos:
                    j = pos[i]
                    expected[r] = (1 - eps[j]) * images[i] + eps[j] * images[int(k0[j])]
            torch.testing.assert_close(x, expected)
            cond.observe(index, synth(index, epoch))
        cond.end_epoch(epoch)
    assert cond.pairs[0].numel() > 0


def _host_state(cond):
    """Clones of every tensor of the condenser's state, to check that a call changed nothing."""
    state = {k: getattr(cond, k).clone() for k in ("values", "counts", "keep", "partner", "eps")}
    state.update(pairs=[t.clone() for t in cond.pairs], kept=cond.kept_indices().clone(),
                 host_partner=cond.host_partner.clone(), host_eps=cond.host_eps.clone(),
                 last_values=None if cond.last_values is None else cond.last_values.clone(),
                 progress=(cond.next_epoch, cond.stage, cond.frozen, dict(cond.samples_yielded), len(cond.history)))
    return state


def _assert_same_state(a, b):
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, list):
            assert all(torch.equal(p, q) for p, q in zip(x, y)), key
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), key
        else:
            assert x == y, key


def test_state_dict_is_a_snapshot():
    n = 80
    synth = Synthetic(n, seed=8)
    cond = KnowledgeCondenser(n, epochs=6, stage_epochs=2, rho=0.5, online_recording=False)
    run_epochs(cond, synth, 3)
    state = cond.state_dict()
    frozen = {k: (tuple(t.clone() for t in v) if isinstance(v, tuple) else v.clone())
              for k, v in state.items() if isinstance(v, (torch.Tensor, tuple))}
    run_epochs(cond, synth, 6, start=3)  # observes and condenses again: the live state changes
    assert not torch.equal(cond.values, frozen["values"]) and not torch.equal(cond.keep, frozen["keep"])
    for key, saved in frozen.items():
        if isinstance(saved, tuple):
            assert all(torch.equal(a, b) for a, b in zip(state[key], saved)), key
        else:
            assert torch.equal(state[key], saved), key
    assert state["next_epoch"] == 3


def test_too_few_kept_points_refused_at_construction():
    for n, rho, epochs in ((1, 0.7, 6), (2, 0.3, 1), (9, 0.1, 4)):
        with pytest.raises(ValueError, match=rf"num_samples`={n} with `rho`={rho}.*at least one"):
            KnowledgeCondenser(n, epochs=epochs, stage_epochs=1, rho=rho)
    cond = KnowledgeCondenser(2, epochs=2, stage_epochs=1, rho=0.5)  # the smallest that works
    assert cond.end_epoch(0).num_kept == 1 and cond.end_epoch(1).num_kept == 1


def test_failed_end_epoch_leaves_the_epoch_open(monkeypatch):
    n = 50
    cond = KnowledgeCondenser(n, epochs=4, stage_epochs=2, rho=0.5)
    sampler = cond.sampler(batch_size=16)
    sampler.set_epoch(0)
    for b in sampler:
        cond.observe(torch.tensor(b), Synthetic(n, seed=9)(torch.tensor(b), 0))
    before = _host_state(cond)
    for bad in (0.0, "0", True, None):
        with pytest.raises(TypeError, match="end_epoch: `epoch` must be an int"):
            cond.end_epoch(bad)
    _assert_same_state(before, _host_state(cond))

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(kcd_fast.ops, "condense", boom)  # the E-step itself fails
    with pytest.raises(RuntimeError, match="injected"):
        cond.end_epoch(0)
    _assert_same_state(before, _host_state(cond))
    monkeypatch.undo()
    monkeypatch.setattr(cond, "_summary", boom)  # fails after the plan is computed
    with pytest.raises(RuntimeError, match="injected"):
        cond.end_epoch(0)
    _assert_same_state(before, _host_state(cond))
    monkeypatch.undo()
    plan = cond.end_epoch(0)  # the epoch is still open: ending it again works
    assert plan is not None and cond.next_epoch == 1 and cond.stage == 0 and len(cond.history) == 1
    assert cond.end_epoch(1) is None and cond.next_epoch == 2


def test_constructor_and_observe_argument_types():
    ok = dict(epochs=2, stage_epochs=1)
    for kwargs, exc, match in [
        (dict(temperature=float("inf")), ValueError, "temperature.*finite"),
        (dict(temperature=float("nan")), ValueError, "temperature.*finite"),
        (dict(temperature=0.0), ValueError, r"temperature.*> 0\.0, got 0\.0"),
        (dict(temperature=1e-40), ValueError, "temperature.*at least .*finite float32"),  # every observe would fail
        (dict(online_recording="no"), TypeError, "online_recording.*True or False"),
        (dict(vaks=1), TypeError, "vaks.*True or False"),
        (dict(adaptive_eps=None), TypeError, "adaptive_eps.*True or False"),
        (dict(temperature="1"), TypeError, "temperature.*number"),
        (dict(alpha="x"), TypeError, "alpha.*number"),
        (dict(alpha=float("nan")), ValueError, "alpha.*finite"),
        (dict(alpha=-0.1), ValueError, "alpha.*>= 0"),
        (dict(rho=float("nan")), ValueError, "rho.*finite"),
        (dict(rho="0.7"), TypeError, "rho.*number"),
        (dict(eps_max=float("inf")), ValueError, "eps_max.*finite"),
        (dict(rank=0.5, world_size=1), TypeError, "rank.*int"),
        (dict(rank=0, world_size=1.0), TypeError, "world_size.*int"),
        (dict(rank=1, world_size=1), ValueError, r"^KnowledgeCondenser: `rank` must lie in \[0, world_size=1\)"),
    ]:
        with pytest.raises(exc, match=match):
            KnowledgeCondenser(10, **ok, **kwargs)
    cond = KnowledgeCondenser(10, **ok)
    for kwargs, exc, match in [
        (dict(rank=0.5, world_size=2), TypeError, "sampler: `rank` must be an int, got 0.5"),  # not truncated to 0
        (dict(rank=0, world_size="2"), TypeError, "sampler: `world_size` must be an int"),
        (dict(rank=0, world_size=0), ValueError, "sampler: `world_size` must be an int >= 1, got 0"),
        (dict(rank=2, world_size=2), ValueError, r"sampler: `rank` must lie in \[0, world_size=2\)"),
    ]:
        with pytest.raises(exc, match=match):
            cond.sampler(**kwargs)
    assert not cond._samplers
    with pytest.raises(TypeError, match="observe: `indices` must be a torch.Tensor"):
        cond.observe([0, 1], torch.randn(2, 3))
    assert not cond.counts.any()


def _condensed_source(n=10, **kwargs):
    cond = KnowledgeCondenser(n, epochs=4, stage_epochs=2, rho=0.5, **kwargs)
    run_epochs(cond, Synthetic(n, seed=10), 1)
    assert cond.pairs[0].numel() > 0
    return cond


def test_load_state_dict_refuses_bad_states_without_changes():
    n = 10
    good = _condensed_source(n).state_dict()
    k1l, k0, eps = good["pairs"]
    more_kept = good["keep"].clone()  # one kept point (of K1H) dropped: the pairs stay valid
    more_kept[[i for i in range(n) if more_kept[i] and i not in k1l.tolist()][0]] = False
    cases = [
        ("partner", torch.zeros(3, dtype=torch.int32), ValueError, r"`partner` must have shape \(10,\)"),
        ("values", torch.tensor([5.0]), ValueError, r"`values` must have shape \(10,\)"),
        ("values", torch.full((n,), float("nan")), ValueError, "`values` must be finite"),
        ("values", torch.zeros(n, dtype=torch.float64), TypeError, "`values` must have dtype"),
        ("counts", -good["counts"] - 1, ValueError, "`counts` must be >= 0"),
        ("counts", [1] * n, TypeError, "`counts` must be a torch.Tensor"),
        ("keep", torch.zeros(n, dtype=torch.bool), ValueError, "`keep` must keep at least one point"),
        ("pairs", (k1l + 100, k0, eps), ValueError, r"`pairs\[0\]` must lie in \[0, 10\)"),
        ("pairs", (k1l, k0, eps.double()), TypeError, r"`pairs\[2\]` must have dtype"),
        ("pairs", (k1l, k1l, eps), ValueError, r"`pairs\[1\]` must be dropped"),
        ("pairs", (k1l, k0), ValueError, "`pairs` must be a .k1l, k0, eps. triple"),
        ("partner", torch.full((n,), -1, dtype=torch.int32), ValueError, "`partner` and `eps` must match"),
        ("next_epoch", 99, ValueError, r"`next_epoch` must lie in \[0, 4\]"),
        ("stage", "0", TypeError, "`stage` must be an int"),
        ("frozen", 1, TypeError, "`frozen` must be a bool"),
        ("samples_yielded", {0: -1}, ValueError, "`samples_yielded`"),
        ("synced", (good["values"], good["counts"]), ValueError, "`synced`"),
        ("stage", good["stage"] - 1, ValueError, r"`stage` -?\d+ does not follow `next_epoch` \d+ \(T=2: stage"),
        ("keep", more_kept, ValueError, rf"`keep` holds {int(more_kept.sum())} samples, but stage "
                                        rf"{good['stage']} keeps {int(good['keep'].sum())}"),
        ("loaded", 1, TypeError, "`loaded` must be a bool"),
        ("loaded_stage", (1,), ValueError, "`loaded_stage` must be None or a .stage, tau. pair"),
    ]
    target = KnowledgeCondenser(n, epochs=4, stage_epochs=2, rho=0.5)
    run_epochs(target, Synthetic(n, seed=11), 1)  # a state of its own, different from `good`
    before = _host_state(target)
    for key, bad, exc, match in cases:
        state = dict(good)
        state[key] = bad
        with pytest.raises(exc, match=match):
            target.load_state_dict(state)
        _assert_same_state(before, _host_state(target))
    for key in ("counts", "loaded", "loaded_stage"):  # every key is required
        missing = dict(good)
        del missing[key]
        with pytest.raises(ValueError, match=f"the state has no `{key}`"):
            target.load_state_dict(missing)
        _assert_same_state(before, _host_state(target))
    target.load_state_dict(good)
    assert torch.equal(target.values, good["values"]) and torch.equal(target.keep, good["keep"])
    assert target.kept_indices().tolist() == good["keep"].nonzero().flatten().tolist()
    # w/o OVR: last_values is checked too.
    ovr = _condensed_source(n, online_recording=False).state_dict()
    target = KnowledgeCondenser(n, epochs=4, stage_epochs=2, rho=0.5, online_recording=False)
    before = _host_state(target)
    with pytest.raises(ValueError, match="`last_values` must be finite"):
        target.load_state_dict({**ovr, "last_values": torch.full((n,), float("inf"))})
    _assert_same_state(before, _host_state(target))


def test_load_condensed_refuses_bad_files_without_changes(tmp_path):
    n = 10
    path = tmp_path / "condensed.pt"
    _condensed_source(n).save_condensed(path)
    blob = torch.load(path, weights_only=True)
    not_kept = int((~blob["keep"]).nonzero()[0])
    cases = [
        (dict(k1l=blob["k1l"] + 100), ValueError, r"`k1l` must lie in \[0, 10\)"),
        (dict(keep=torch.tensor([False])), ValueError, r"`keep` must have shape \(10,\)"),
        (dict(keep=torch.zeros(n, dtype=torch.bool)), ValueError, "`keep` must keep at least one point"),
        (dict(eps=torch.full_like(blob["eps"], float("nan"))), ValueError, r"`eps` must lie in \[0, 1\]"),
        (dict(k0=blob["k1l"]), ValueError, "`k0` must be dropped"),
        (dict(k1l=torch.full_like(blob["k1l"], not_kept)), ValueError, "`k1l` must not repeat"),
        (dict(k1l=blob["k1l"].int()), TypeError, "`k1l` must have dtype"),
        (dict(k0=blob["k0"][:1]), ValueError, "1-D of one length"),
        (dict(version=99), ValueError, "version 99"),
    ]
    target = KnowledgeCondenser(n, epochs=4, stage_epochs=2, rho=0.5)
    before = _host_state(target)
    for change, exc, match in cases:
        torch.save({**blob, **change}, tmp_path / "bad.pt")
        with pytest.raises(exc, match=match):
            target.load_condensed(tmp_path / "bad.pt")
        _assert_same_state(before, _host_state(target))
    plan = target.load_condensed(path)
    assert target.frozen and torch.equal(target.keep, blob["keep"]) and torch.equal(plan.k1l, blob["k1l"])


def _ddp_resume_worker(rank, world_size, init_file, out_dir, n, epochs, stage, checkpoint_after, run_until):
    """Three runs on one process group: uninterrupted; uninterrupted but checkpointing (the collective
    state_dict) after epoch ``checkpoint_after``; killed there and resumed from rank 0's checkpoint."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    synth = Synthetic(n, seed=12)
    out = {}
    for mode in ("plain", "checkpointed", "resumed"):
        cond = KnowledgeCondenser(n, epochs=epochs, stage_epochs=stage)
        plans, _ = run_epochs(cond, synth, checkpoint_after + 1, batch=16)
        if mode != "plain":
            state = cond.state_dict()  # every rank: it merges the ranks' records
            if rank == 0:
                torch.save(state, f"{out_dir}/ckpt.pt")
            dist.barrier()
        if mode == "resumed":
            cond = KnowledgeCondenser(n, epochs=epochs, stage_epochs=stage)
            cond.load_state_dict(torch.load(f"{out_dir}/ckpt.pt", weights_only=False))
            dist.barrier()
        later, _ = run_epochs(cond, synth, run_until, batch=16, start=checkpoint_after + 1)
        plans.update(later)
        out[mode] = {"values": cond.values, "counts": cond.counts, "keep": cond.keep, "partner": cond.partner,
                     "plans": {e: (p.keep, p.k1l, p.k0) for e, p in plans.items()},
                     "kept": [h["kept"] for h in cond.history]}
    torch.save(out, f"{out_dir}/resume{rank}.pt")
    dist.destroy_process_group()


def test_ddp_resume_from_a_mid_stage_checkpoint_is_exact(tmp_path):
    # Boundaries at the ends of epochs 0 and 3; the checkpoint after epoch 1 holds unmerged deltas.
    n, epochs, stage, checkpoint_after, run_until = 301, 6, 3, 1, 5
    torch.multiprocessing.spawn(_ddp_resume_worker, nprocs=2, join=True,
                                args=(2, str(tmp_path / "init"), str(tmp_path), n, epochs, stage,
                                      checkpoint_after, run_until))
    for rank in range(2):
        runs = torch.load(tmp_path / f"resume{rank}.pt", weights_only=False)
        plain, saved, resumed = runs["plain"], runs["checkpointed"], runs["resumed"]
        # As the trainer runs (state_dict on every rank every epoch), resuming changes nothing.
        for key in ("values", "counts", "keep", "partner"):
            assert torch.equal(resumed[key], saved[key]), (rank, key)
        # The early merge only moves the sync point: the same records as one merge at the stage end
        # (the float32 running means may round differently).
        for key in ("counts", "keep", "partner"):
            assert torch.equal(resumed[key], plain[key]), (rank, key)
        torch.testing.assert_close(resumed["values"], plain["values"], atol=1e-6, rtol=1e-6)
        assert resumed["plans"].keys() == plain["plans"].keys() == {0, 3}
        for e in (0, 3):
            assert all(torch.equal(a, b) for a, b in zip(resumed["plans"][e], plain["plans"][e])), (rank, e)
        assert resumed["kept"] == plain["kept"]


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i], i % 3


@pytest.mark.parametrize("kind", ["uint8 tensor", "int16 tensor", "float16 tensor", "uint8 array", "float32 array"])
def test_dataset_wrapper_keeps_the_inputs_type_and_dtype(kind):
    # A mixed point keeps its input's dtype: a float32 point among uint8 ones would fail the default
    # collate in loader workers (and silently promote the batch without them).
    n = 40
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (n, 3, 5), generator=g, dtype=torch.uint8)
    cond = KnowledgeCondenser(n, epochs=2, stage_epochs=1, rho=0.5)
    run_epochs(cond, Synthetic(n, seed=2), 1)
    k1l, k0, eps = cond.pairs
    assert k1l.numel() > 0
    dtype = {"uint8 tensor": torch.uint8, "int16 tensor": torch.int16, "float16 tensor": torch.float16,
             "uint8 array": torch.uint8, "float32 array": torch.float32}[kind]
    data = raw.to(dtype) * (-1 if dtype == torch.int16 else 1)
    items = [x.numpy() for x in data] if "array" in kind else list(data)
    ds = KCDDataset(_ListDataset(items), cond)
    expected = data.clone()
    if dtype == torch.uint8:
        kcd_fast.vaks_mix_(expected, k1l, k0, eps)
    exact = R.vaks_mix(data.double(), k1l, k0, eps)  # float64 oracle
    for i in range(n):
        x = ds[i][0]
        assert type(x) is type(items[i]) and x.dtype == items[i].dtype
        x = torch.as_tensor(x)
        if dtype.is_floating_point:
            torch.testing.assert_close(x.double(), exact[i], atol=2e-3, rtol=2e-3)
        else:
            assert int((x.double() - exact[i]).abs().max()) <= 1  # rounded to nearest
            if dtype == torch.uint8:
                assert int((x.int() - expected[i].int()).abs().max()) <= 1  # as vaks_mix_ rounds
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=n, num_workers=1)))
    assert batch[0].dtype == dtype and batch[0].shape == (n, 3, 5)


def test_dataset_wrapper_names_inputs_it_cannot_mix():
    n = 20
    cond = KnowledgeCondenser(n, epochs=2, stage_epochs=1, rho=0.5)
    run_epochs(cond, Synthetic(n, seed=2), 1)
    ds = KCDDataset(_ListDataset([f"image{i}.png" for i in range(n)]), cond)
    j = int(cond.pairs[0][0])
    with pytest.raises(TypeError, match=f"sample {j} is str and its partner str; give the wrapped dataset a "
                                        "transform that returns tensors"):
        ds[j]
    assert ds[int(cond.pairs[1][0])][0] == f"image{int(cond.pairs[1][0])}.png"  # a K0 point is not mixed


def test_a_condenser_and_its_sampler_pickle(tmp_path):
    import pickle

    n = 30
    cond = KnowledgeCondenser(n, epochs=2, stage_epochs=1, rho=0.5)
    run_epochs(cond, Synthetic(n, seed=3), 1)
    sampler = cond.sampler()
    sampler.set_epoch(1)
    copy = pickle.loads(pickle.dumps(cond))
    assert torch.equal(copy.keep, cond.keep) and torch.equal(copy.values, cond.values)
    assert copy.next_epoch == cond.next_epoch and len(copy._samplers) == 0
    again = pickle.loads(pickle.dumps(sampler))
    assert list(again) == list(sampler)
    torch.save(cond, tmp_path / "c.pt")
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=False).keep, cond.keep)


def test_observe_after_the_last_epoch_and_other_misuse_is_named():
    n = 12
    cond = KnowledgeCondenser(n, epochs=2, stage_epochs=1, rho=0.5)
    run_epochs(cond, Synthetic(n, seed=3), 2)
    before = _host_state(cond)
    with pytest.raises(ValueError, match="observe: all 2 epochs of this condenser have ended"):
        cond.observe(torch.arange(4), torch.randn(4, 5))
    with pytest.raises(TypeError, match="mix_buffer_: `buffer` must be a torch.Tensor, got list"):
        cond.mix_buffer_([0.0] * n)
    with pytest.raises(ValueError, match=r"mix_buffer_: `buffer` must have one row per sample \(12\), got shape \(\)"):
        cond.mix_buffer_(torch.tensor(1.0))
    _assert_same_state(before, _host_state(cond))


def test_predicted_cost_of_a_frozen_set_is_its_kept_fraction(tmp_path):
    cond, _ = _plan_of()
    cond.save_condensed(tmp_path / "c.pt")
    frozen = KnowledgeCondenser(cond.num_samples, epochs=4, stage_epochs=4, rho=0.6)
    frozen.load_condensed(tmp_path / "c.pt")
    predicted = frozen.predicted_cost()
    assert predicted["eq16"] is None and predicted["schedule"] == int(cond.keep.sum()) / cond.num_samples
    sampler = frozen.sampler()
    for epoch in range(4):
        sampler.set_epoch(epoch)
        list(sampler)
        frozen.end_epoch(epoch)
    assert frozen.measured_cost()["C"] == pytest.approx(predicted["schedule"])
