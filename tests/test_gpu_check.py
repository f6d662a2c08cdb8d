"""benchmarks/gpu_check.sh's plan, read from its dry run (KCD_GPU_CHECK_DRY_RUN=1) on any machine: which
build, which tests and which timings each mode runs, in which order and under which caps; and
benchmarks/verdict.py, which reads the acceptance bounds from a results folder."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def plan(tmp_path, *modes, **env) -> list:
    """The commands a dry run would run, as (cap seconds, command) in order."""
    run_env = dict(os.environ, KCD_GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path / "out"), **env)
    res = subprocess.run(["bash", "benchmarks/gpu_check.sh", *modes], cwd=ROOT, env=run_env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [(int(m[1]), m[2]) for m in re.finditer(r"would run \(cap (\d+)s\): (.*)", res.stdout)]


def test_two_modes_build_and_test_once_then_time_each_in_the_order_given(tmp_path):
    steps = plan(tmp_path, "distillers", "loader", KCD_GPU_CHECK_DATA="/tmp/jpegs")
    commands = [c for _, c in steps]
    assert sum("pip install" in c for c in commands) == 1 and "pip install" in commands[0]
    tests = [c for c in commands if "-m pytest" in c]
    assert len(tests) == 1 and "pytest" in commands[1]
    files = tests[0].split("cacheprovider ")[1].split()
    assert len(files) == len(set(files))
    for name in ("test_crd.py", "test_integrations.py", "test_jpeg_loader.py", "benchmarks/test_loader.py"):
        assert any(f.endswith(name) for f in files), name
    order = [s for c in commands[2:] for s in ("crd_kernel", "distiller_step", "lightning_callback_step",
                                               "benchmarks.loader") if s in c]
    assert order == ["crd_kernel", "distiller_step", "lightning_callback_step", "benchmarks.loader"]
    assert "--data-dir /tmp/jpegs" in commands[-1]
    assert all(c.count(str(tmp_path / "out")) <= 1 for c in commands)

    reverse = [c for _, c in plan(tmp_path, "loader", "distillers")]
    assert "benchmarks.loader" in reverse[2] and "lightning_callback_step" in reverse[-1]


def test_each_mode_alone_runs_what_it_always_ran(tmp_path):
    full = [c for _, c in plan(tmp_path)]
    assert [s for c in full for s in ("wall_ratio", "stage_end_profile", "--benchmark-only", "sweep") if s in c] \
        == ["wall_ratio", "stage_end_profile", "--benchmark-only"]
    assert "benchmarks/ --benchmark-only" in full[-1] and "tests/test_cuda.py" in full[1]
    swept = [c for _, c in plan(tmp_path, "all", KCD_GPU_CHECK_SWEEP="1")]
    assert "sweep_update_values" in swept[-1]

    update = [c for _, c in plan(tmp_path, "update-values")]
    assert "test_update_values.py" in update[1] and "test_cuda.py" not in update[1]
    assert "benchmarks/test_ops.py -k update_values" in update[2] and "sweep_update_values" in update[3]
    walls = [c for _, c in plan(tmp_path, "wall-ratio")]
    assert len(walls) == 3 and "wall_ratio.py" in walls[2]
    loader = [c for _, c in plan(tmp_path, "loader")]
    assert len(loader) == 3 and "--data-dir" not in loader[2]


@pytest.mark.parametrize("modes, deadline", [(("distillers",), 440), (("loader",), 570), (("distillers", "loader"), 570)])
def test_every_cap_is_within_the_deadline(tmp_path, modes, deadline):
    assert max(cap for cap, _ in plan(tmp_path, *modes)) <= deadline
    assert max(cap for cap, _ in plan(tmp_path, *modes, KCD_GPU_CHECK_DEADLINE="100")) <= 100


def test_an_unknown_mode_is_refused_before_anything_runs(tmp_path):
    res = subprocess.run(["bash", "benchmarks/gpu_check.sh", "distillers", "loaders"], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, KCD_GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path / "out")))
    assert res.returncode == 2 and "got 'loaders'" in res.stderr and "distillers, loader" in res.stderr
    assert not (tmp_path / "out").exists()


def results_folder(path: Path, **changes) -> Path:
    """A results folder whose every figure meets its bound; ``changes`` replace files (None: absent)."""
    gpu = "NVIDIA H200"
    files = {
        "tests.log": "854 passed\nVERDICT: correctness passed\n",
        "crd_kernel.json": {"device": gpu, "smoke": False, "results": [
            {"case": "loss_fp16", "fused_ms": 1.2, "speedup": 3.5, "memory_ratio": 0.05},
            {"case": "loss_fp32", "fused_ms": 2.0, "speedup": 2.0, "memory_ratio": 0.5}]},
        "distiller_step.json": {"device": gpu, "smoke": False, "taps_overhead": {"measured": 0.004},
                                "arms": {"kd": {"vs_kd": 1.0}, "kd_tapped": {"vs_kd": 1.004},
                                         "crd": {"vs_kd": 1.1}, "reviewkd": {"vs_kd": 1.3}}},
        "lightning_callback_step.json": {"device": gpu, "smoke": False, "overhead_pct": 0.05},
        "loader.json": {"device": gpu, "smoke": False, "targets": {
            "gpu_loader_images_per_s": 16000.0, "gpu_over_cached_step_consumption": 1.23,
            "cached_step_images_per_s": 13008.0, "cached_step_images_per_s_from": "measured",
            "gpu_over_decode_ceiling": 0.8, "kd_step_gpu_16w_over_bound": 1.01,
            "kd_step_pil_8w_over_bound": 1.3, "cached_step_gpu_16w_over_bound": 1.04,
            "cached_step_gpu_in_turn_16w_over_bound": 1.2,
            "runs_gpu": {"kd": {"ratio_to_kd": 1.0, "C": 1.0}, "kcd": {"ratio_to_kd": 0.84, "C": 0.82},
                         "kcd_cached": {"ratio_to_kd": 0.6, "C": 0.82}}}},
    }
    files.update(changes)
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if content is not None:
            (path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def verdict_of(folder: Path) -> tuple[int, list]:
    res = subprocess.run([sys.executable, "-m", "benchmarks.verdict", str(folder)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert not res.stderr.strip() or res.returncode in (0, 1), res.stderr
    return res.returncode, res.stdout.splitlines()


def test_the_verdict_reads_every_bound_of_a_results_folder(tmp_path):
    rc, lines = verdict_of(results_folder(tmp_path / "ok"))
    assert rc == 0, lines
    assert sum(line.startswith("holds") for line in lines) == 11 and not any("not measured" in x for x in lines)
    # crd and reviewkd against KD; pil's fed step, and gpu's with each batch prepared in turn (no bound)
    assert sum(line.startswith("info") for line in lines) == 4
    assert any(x.startswith("info") and "gpu_in_turn" in x and "1.200x" in x for x in lines)
    assert any("1.200 ms" in x and "<= 1.5 ms" in x for x in lines)
    assert any(x.startswith("holds") and "16000 images/s: 1.23x of 13008 (measured), 80.0%" in x for x in lines)

    # the GPU loader below 1.2x the cached step still holds at >= 90% of nvJPEG's ceiling
    ceiling = results_folder(tmp_path / "ceiling")
    loader = json.loads((ceiling / "loader.json").read_text())
    loader["targets"] |= {"gpu_over_cached_step_consumption": 0.7, "gpu_over_decode_ceiling": 0.93}
    (ceiling / "loader.json").write_text(json.dumps(loader))
    assert verdict_of(ceiling)[0] == 0


@pytest.mark.parametrize("file, change, failing", [
    ("tests.log", "3 failed\nVERDICT: correctness FAILED (pytest rc 1)\n", "the GPU correctness tests pass"),
    ("lightning_callback_step.json", {"device": "NVIDIA H200", "overhead_pct": 0.2}, "the callback adds <= 0.1%"),
    ("distiller_step.json", {"device": "NVIDIA H200", "taps_overhead": {"measured": 0.02}, "arms": {}},
     "the taps add <= 1%"),
])
def test_a_bound_that_fails_is_named_and_fails_the_verdict(tmp_path, file, change, failing):
    rc, lines = verdict_of(results_folder(tmp_path, **{file: change}))
    assert rc == 1 and [x for x in lines if x.startswith("FAILS")] == [x for x in lines if failing in x]


def test_absent_smoke_and_cpu_results_are_not_measurements(tmp_path):
    folder = results_folder(tmp_path, **{"crd_kernel.json": None,
                                         "distiller_step.json": {"smoke": True, "taps_overhead": {"measured": 9}},
                                         "loader.json": {"device": "cpu", "targets": {"runs_cpu": {}}}})
    rc, lines = verdict_of(folder)
    assert rc == 0
    assert [x for x in lines if x.startswith("not measured")] == [
        "not measured  crd_kernel.json: absent",
        "not measured  distiller_step.json: a smoke run, not a measurement",
        "not measured  loader.json: measured on the CPU, where its GPU bounds do not apply"]

    cut = results_folder(tmp_path / "cut", **{"distiller_step.json": {"device": "NVIDIA H200", "arms": {}},
                                              "crd_kernel.json": {"device": "NVIDIA H200", "results": []}})
    rc, lines = verdict_of(cut)
    assert rc == 0 and "not measured  distiller_step.json: incomplete (no 'taps_overhead')" in lines
    assert any(x.startswith("not measured  crd_kernel.json: incomplete") for x in lines)

    loader = results_folder(tmp_path / "loaders-only", **{"loader.json": {"device": "NVIDIA H200", "targets": {
        "gpu_loader_images_per_s": 9000.0, "gpu_over_cached_step_consumption": 0.69, "gpu_over_decode_ceiling": 0.95}}})
    rc, lines = verdict_of(loader)
    assert rc == 0 and any(x.startswith("holds  GPU loader") and "95.0%" in x for x in lines)
    assert [x for x in lines if x.startswith("not measured") and "loader.json" in x] == [
        "not measured  steps fed by gpu within 5% of their bound  (loader.json)",
        "not measured  kcd run on JPEG files <= 0.85x KD's training time  (loader.json)",
        "not measured  kcd_cached run on JPEG files <= 0.62x KD's training time  (loader.json)"]
