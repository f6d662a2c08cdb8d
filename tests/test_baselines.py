"""The benchmark baselines compute what kcd_fast computes, so their ratios compare equal work."""
import json
import numpy as np
import torch

from benchmarks import baselines
from kcd_fast import ops
from helpers import TRITON_DEVICE, make_state


def test_eager_update_matches():
    values, counts = make_state(100, seed=1)
    idx = torch.tensor([3, 5, 3, 99, 0])
    logits = torch.randn(5, 13)
    v1, f1, v2, f2 = values.clone(), counts.clone(), values.clone(), counts.clone()
    e1 = ops.update_values(v1, f1, idx, logits)
    e2 = baselines.eager_update_values(v2, f2, idx, logits)
    torch.testing.assert_close(e1, e2)
    torch.testing.assert_close(v1, v2)
    assert torch.equal(f1, f2)


def test_official_recorder_and_estep_rank_like_kcd():
    n, epochs = 500, 3
    rec = baselines.OfficialRecorder(n)
    values = torch.zeros(n)
    counts = torch.zeros(n, dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for b in range(0, n, 50):
            idx = perm[b:b + 50]
            logits = torch.randn(len(idx), 10, generator=g)
            rec.observe(idx, logits)
            ops.update_values(values, counts, idx, logits)
        rec.end_epoch()
    assert rec.record.shape == (n, epochs)
    remain, lost, mix_remain = baselines.official_estep(rec.record, 400, n, stage_epochs=40, alpha=0.03)
    plan = ops.condense(values, counts, keep=400, alpha=0.03, eps_max=0.3)
    # Same values up to float32 rounding: the kept sets agree but for near-ties at the boundary.
    overlap = len(set(remain.tolist()) & set(plan.order[:400].tolist()))
    assert overlap >= 398
    assert len(lost) == 100 and len(mix_remain) == 100


def test_official_record_holds_the_same_values():
    values, counts = make_state(2000, seed=4, max_count=6)
    # Every point is seen before the first condensation (epoch 0 is full); the official code
    # reads an entropy <= 0 as "not seen" and would rank a never-seen point (0/0) first.
    counts.clamp_(min=1)
    values.uniform_(0.01, 4.0, generator=torch.Generator().manual_seed(5))
    record = baselines.official_record(values, counts, 10)
    assert record.shape == (2000, 10)
    remain, _, _ = baselines.official_estep(record, 1500, 2000, stage_epochs=40, alpha=0.03)
    plan = ops.condense(values, counts, keep=1500, alpha=0.03, eps_max=0.3)
    assert len(set(remain.tolist()) ^ set(plan.order[:1500].tolist())) <= 4  # float64 vs float32 near-ties


def test_eager_condense_matches():
    values, counts = make_state(1000, seed=2)
    prev = torch.rand(1000, generator=torch.Generator().manual_seed(3)) < 0.9
    keep, k1l, k0, eps = baselines.eager_condense(values, counts, 700, 0.03, 0.3, prev)
    plan = ops.condense(values, counts, keep=700, alpha=0.03, eps_max=0.3, previous_keep=prev)
    assert torch.equal(keep, plan.keep) and torch.equal(k1l, plan.k1l) and torch.equal(k0, plan.k0)
    torch.testing.assert_close(eps, plan.eps)


def test_mix_baselines_match():
    buf = torch.rand(30, 8).half()
    dst, src, eps = torch.arange(10), torch.arange(10, 20), torch.rand(10) * 0.3
    a, b, c = buf.clone(), buf.clone(), buf.clone()
    ops.vaks_mix_(a, dst, src, eps)
    baselines.eager_vaks_mix_(b, dst, src, eps)
    baselines.official_vaks_mix_(c, dst, src, eps)
    assert torch.equal(a, b) and torch.equal(a, c)
    img = torch.randint(0, 256, (30, 4), dtype=torch.uint8)
    x, y = img.clone(), img.clone()
    z = img.clone()
    ops.vaks_mix_(x, dst, src, eps)
    baselines.eager_vaks_mix_(y, dst, src, eps)
    baselines.official_vaks_mix_(z, dst, src, eps)
    assert torch.equal(x, y)  # both round to nearest
    # The official code truncates: never above the rounded pixel, at most one level below it.
    assert bool(((x.int() - z.int()) >= 0).all()) and int((x.int() - z.int()).max()) == 1
    assert np.isfinite(eps.numpy()).all()


def test_update_values_sweep_checks_every_launch_configuration(tmp_path):
    """benchmarks/sweep_update_values.py: every launch configuration matches the float64 reference
    (interpreter here)."""
    from benchmarks import sweep_update_values

    out = tmp_path / "sweep.json"
    assert 0 == sweep_update_values.main(["--device", TRITON_DEVICE, "--check-only", "--batch", "5", "--classes",
                                          "40", "--n", "50", "--warps", "1", "4", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    # 2 dtypes x (2 warps x 2 paths, vectorised, + the default not vectorised)
    assert len(rows) == 10 and all(r["checked"] for r in rows)
    assert {(r["num_warps"], r["tile"], r["vectorize"]) for r in rows} == {
        (1, True, True), (4, True, True), (1, False, True), (4, False, True), (4, True, False)}
    assert [r["default"] for r in rows] == [False, True, False, False, False] * 2
    assert {r["row_vector_width"] for r in rows} == {1, 4, 8}  # C = 40: fp32 4, bf16 8, or no promise


def test_update_values_sweep_sweeps_only_the_chunked_path_where_one_tile_does_not_fit(tmp_path):
    """C > 4096: no one-tile configuration to try; the chunked path (with 8 warps) is the default, and
    the row-sum floor loads the row in chunks as that path does."""
    from benchmarks import sweep_update_values

    out = tmp_path / "sweep.json"
    assert 0 == sweep_update_values.main(["--device", TRITON_DEVICE, "--check-only", "--batch", "2", "--classes",
                                          "4100", "--n", "20", "--warps", "8", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tile"], r["vectorize"], r["default"]) for r in rows] == [(False, True, True), (False, False, False)] * 2
    assert all(r["checked"] for r in rows)


def test_update_values_sweep_reports_a_configuration_that_fails_its_check(tmp_path, monkeypatch):
    """A wrong configuration is reported in its row and by the exit status, and the others still run."""
    from benchmarks import sweep_update_values

    real = sweep_update_values.update_values_triton

    def chunked_off(*args, tile=None, **kwargs):
        out = real(*args, tile=tile, **kwargs)
        return out + 1e-3 if tile is False else out

    monkeypatch.setattr(sweep_update_values, "update_values_triton", chunked_off)
    out = tmp_path / "sweep.json"
    n_failed = sweep_update_values.main(["--device", TRITON_DEVICE, "--check-only", "--batch", "3", "--classes",
                                         "8", "--n", "20", "--warps", "4", "--out", str(out)])
    assert n_failed == 2  # chunked, in fp32 and in bf16; the script then exits with status 1
    rows = json.loads(out.read_text())["rows"]
    failed = [r for r in rows if not r["checked"]]
    assert len(rows) == 6 and len(failed) == 2 and all(r["tile"] is False for r in failed)
    assert all("AssertionError" in r["error"] for r in failed)


def test_update_values_sweep_timing_leaves_the_checked_state_alone(tmp_path, monkeypatch):
    """The timed calls record into state too: that must not be the state the next configuration's
    check starts from, or every configuration after the first timed one would fail its check."""
    from benchmarks import sweep_update_values

    def run_it(fn, reps=30):  # a stand-in for the graph replay: calls fn, as the timing does
        fn()
        return 1.0

    monkeypatch.setattr(sweep_update_values, "device_time_us", run_it)
    out = tmp_path / "sweep.json"
    assert 0 == sweep_update_values.main(["--device", TRITON_DEVICE, "--batch", "3", "--classes", "8", "--n", "20",
                                          "--warps", "4", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    configs = [r for r in rows if r["provider"] == "kcd_fast"]
    assert len(configs) == 6 and all(r["checked"] and r["device_us"] == 1.0 for r in configs)
    assert {r["provider"] for r in rows} == {"kcd_fast", "eager", "floor: launch", "floor: row sum"}


def test_accuracy_table_pairs_each_variant_with_kd_on_the_same_seed():
    from benchmarks.accuracy_kcd_vs_kd import table

    rows = [{"seed": s, "variant": v, "final_top1": top1, "best_top1": top1 + 1, "C": c, "train_time_s": t}
            for s, v, top1, c, t in [(0, "kd", 90.0, 1.0, 10.0), (1, "kd", 92.0, 1.0, 20.0),
                                     (0, "kcd", 91.0, 0.8, 8.0), (1, "kcd", 92.0, 0.8, 18.0)]]
    lines = table(rows, ["kd", "kcd", "kcd_random"]).splitlines()
    assert len(lines) == 4, "no row for a variant without runs"
    assert lines[2] == "| kd | 2 | 91.00 ± 1.41 | 92.00 ± 1.41 | - | 1.000 | 1.000 |"
    # Δ per seed: +1 and 0 -> 0.50 ± 0.71; time ratio per seed: 0.8 and 0.9 -> 0.850
    assert lines[3] == "| kcd | 2 | 91.50 ± 0.71 | 92.50 ± 0.71 | 0.50 ± 0.71 | 0.800 | 0.850 |"


def test_accuracy_kcd_vs_kd_distils_one_teacher_in_every_variant(tmp_path):
    from benchmarks import accuracy_kcd_vs_kd as A

    out = tmp_path / "a.json"
    A.main(["--dataset", "digits", "--seeds", "0", "1", "--variants", "kd", "kcd", "--out", str(out), "--",
            "--epochs", "2", "--stage-epochs", "1", "--teacher-epochs", "1"])
    res = json.loads(out.read_text())
    assert [(r["seed"], r["variant"]) for r in res["runs"]] == [(0, "kd"), (0, "kcd"), (1, "kd"), (1, "kcd")]
    kd, kcd = res["runs"][:2]
    assert kd["C"] == 1.0 and kcd["C"] < 1.0 and kd["teacher_passes"] == 2 * 1437
    assert res["trainer_options"] == ["--epochs", "2", "--stage-epochs", "1", "--teacher-epochs", "1"]
    assert 0 < res["teacher_top1"] <= 100 and "| kcd | 2 |" in res["table"]


def test_stage_end_profile_times_and_profiles_each_stage_end(tmp_path):
    """benchmarks/stage_end_profile.py (run by gpu_check after the whole runs): one wall time per stage
    end, and the profile names the ops a stage end runs (the rank and the buffer's VAKS among them)."""
    from benchmarks import stage_end_profile

    out = tmp_path / "se.json"
    stage_end_profile.main(["--n", "300", "--classes", "7", "--epochs", "4", "--stage-epochs", "2", "--rows", "60",
                            "--out", str(out)])
    got = json.loads(out.read_text())
    assert got["config"]["stage_ends"] == 2 and len(got["stage_end_ms"]) == 2
    assert all(t > 0 for t in got["stage_end_ms"])
    ops_seen = {row["op"] for row in got["profile"]}
    assert {"kcd_fast::rank", "kcd_fast::vaks_mix_"} <= ops_seen
    assert all(row["calls"] >= 1 for row in got["profile"])
