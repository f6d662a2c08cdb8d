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
                                           ("lightning_callback_step.py", "lightning")])
def test_gpu_benchmark_runs_its_smoke_sizes(tmp_path, script, needs):
    if needs:
        pytest.importorskip(needs)
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result.get("smoke") is True, sorted(result)
