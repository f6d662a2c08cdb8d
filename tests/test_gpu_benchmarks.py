"""The GPU benchmarks that CI cannot time still run here, at tiny sizes on the CPU (``--smoke``), so
that a change cannot break them unnoticed before a GPU machine runs them (benchmarks/gpu_check.sh)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script, needs", [("distiller_step.py", None), ("crd_kernel.py", None),
                                           ("lightning_callback_step.py", "lightning"), ("loader.py", None)])
def test_gpu_benchmark_runs_its_smoke_sizes(tmp_path, script, needs):
    if needs:
        pytest.importorskip(needs)
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    # benchmarks/loader.py imports its JPEG writer from benchmarks/loader_cpu.py: run as a module.
    command = ["-m", "benchmarks." + script[:-3]] if script == "loader.py" else [str(ROOT / "benchmarks" / script)]
    res = subprocess.run([sys.executable, *command, "--smoke", "--out", str(out)],
                         cwd=ROOT if script == "loader.py" else tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result.get("smoke") is True, sorted(result)
