"""benchmarks/gpu_check.sh's plan, read from its dry run (KCD_GPU_CHECK_DRY_RUN=1) on any machine: which
build, which tests and which timings each mode runs, in which order and under which caps."""
from __future__ import annotations

import os
import re
import subprocess
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
