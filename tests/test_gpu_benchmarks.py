"""The GPU benchmarks that CI cannot time still run here, at tiny sizes on the CPU (``--smoke``), so
that a change cannot break them unnoticed before a GPU machine runs them (benchmarks/gpu_check.sh)."""
from __future__ import annotations

import argparse
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


@pytest.mark.slow
def test_loader_benchmark_keeps_its_files_and_runs_the_parts_asked_for(tmp_path, monkeypatch):
    """--data-dir: written once, read again as they are (the same counts, no rewrite); --parts: those alone."""
    monkeypatch.chdir(ROOT)
    from benchmarks import loader

    monkeypatch.setattr(loader, "SIZE", dict(loader.SIZE))
    data = tmp_path / "imagenet"
    loader.main(["--smoke", "--data-dir", str(data), "--parts", "loaders", "--out", str(tmp_path / "a.json")])
    first = json.loads((tmp_path / "a.json").read_text())
    assert "loaders" in first and "steps" not in first and "runs" not in first
    assert first["files"]["synthetic"] and "write_s" in first["files"]
    assert not (tmp_path / "imagenet.partial").exists()
    stamps = {f: f.stat().st_mtime_ns for f in data.rglob("*.JPEG")}
    assert len(stamps) == first["files"]["train"] + first["files"]["val"]

    loader.main(["--smoke", "--data-dir", str(data), "--parts", "loaders", "--out", str(tmp_path / "b.json")])
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["files"]["reused"] and "write_s" not in second["files"]
    assert {k: v for k, v in second["files"].items() if k != "reused"} == {
        k: v for k, v in first["files"].items() if k != "write_s"}
    assert {f: f.stat().st_mtime_ns for f in data.rglob("*.JPEG")} == stamps


def test_loader_benchmark_reads_a_folder_it_did_not_write_and_refuses_bad_options(tmp_path, monkeypatch):
    from benchmarks import loader

    root = tmp_path / "mine"
    for split, names in (("train", ["a/1.jpg", "a/2.JPEG", "b/3.jpeg", "b/notes.txt"]), ("val", ["a/4.jpg"])):
        for name in names:
            (root / split / name).parent.mkdir(parents=True, exist_ok=True)
            (root / split / name).write_bytes(b"\xff\xd8" + bytes(98))
    files = loader.existing_folders(root)
    assert (files["train"], files["val"], files["classes"], files["synthetic"]) == (3, 1, 2, False)
    assert files["mean_train_kb"] == pytest.approx(0.1)

    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(SystemExit, match="--data-dir: .* holds no .JPEG/.jpg files"):
        loader.existing_folders(tmp_path / "empty")
    (tmp_path / "other" / "x").mkdir(parents=True)
    monkeypatch.setattr(loader, "SIZE", dict(loader.SIZE))
    with pytest.raises(SystemExit, match="--data-dir: .* holds files but no train/ folder"):
        loader.main(["--smoke", "--data-dir", str(tmp_path / "other"), "--out", str(tmp_path / "c.json")])
    assert not (tmp_path / "c.json").exists()
    with pytest.raises(SystemExit):
        loader.main(["--parts", "loaders,ceiling", "--out", str(tmp_path / "c.json")])
    with pytest.raises(argparse.ArgumentTypeError, match="expected a comma-separated list of loaders, "):
        loader.parse_parts("loaders,ceiling")


def test_loader_targets_bound_each_fed_step_by_the_step_or_the_loader():
    """A fed step's bound is the larger of the resident step and the loader's time per batch (median pass)."""
    from benchmarks import loader

    cores = f"{loader.CORES}w"
    passes = [[{"loader": "pil", "workers": loader.CORES, "images_per_s": pil, "workers_images_per_s": pil},
               {"loader": "cpu", "workers": loader.CORES, "images_per_s": cpu, "workers_images_per_s": 2 * cpu}]
              for pil, cpu in ((100.0, 900.0), (300.0, 1000.0), (200.0, 800.0))]
    out = {"size": {"batch": 50}, "loaders": passes,
           "steps": {"kd": {"resident_s": 0.1, f"pil_{cores}_s": 0.3, f"cpu_{cores}_s": 0.105,
                            f"pil_in_turn_{cores}_s": 0.4}}}
    t = loader.targets(out)
    # a feed prepared in turn is bound by the same loader's rate
    assert t[f"kd_step_pil_in_turn_{cores}_over_bound"] == pytest.approx(0.4 / 0.25)
    assert t[f"kd_step_pil_{cores}_over_bound"] == pytest.approx(0.3 / (50 / 200.0))  # loader-bound: 0.25 s
    assert t[f"kd_step_cpu_{cores}_over_bound"] == pytest.approx(0.105 / 0.1)  # 50/900 s < the step
    assert t[f"kd_step_pil_{cores}_over_resident"] == pytest.approx(3.0)
    assert t["cpu_over_pil_same_workers"] == pytest.approx(4.0)  # the median pass: 9, 10/3 and 4
    assert "runs_gpu" not in t and loader.targets({"size": {"batch": 1}}) == {}
    # the GPU loader's yardstick: the cached step of the same run once timed, else the documented figure
    assert loader.cached_step_consumption({"size": {"batch": 256}, "steps": {"cached": {"resident_s": 0.02}}}) == (
        pytest.approx(12_800), "measured")
    assert loader.cached_step_consumption({"size": {"batch": 256}}) == (13_000, "docs/performance.md (H200)")


def test_the_gpu_loader_is_read_against_the_cached_step_of_the_same_run(monkeypatch):
    from benchmarks import loader

    monkeypatch.setattr(loader, "CUDA", True)
    cores = f"{loader.CORES}w"
    rates = [{"loader": name, "workers": loader.CORES, "images_per_s": rate, "workers_images_per_s": rate}
             for name, rate in (("pil", 3000.0), ("cpu", 5000.0), ("gpu", 15000.0))]
    out = {"size": {"batch": 256}, "loaders": [rates], "decode_ceiling": {"images_per_s": 16000.0}}
    t = loader.targets(out)
    assert t["cached_step_images_per_s_from"] == "docs/performance.md (H200)"
    assert t["gpu_over_cached_step_consumption"] == pytest.approx(15000 / 13000)
    out["steps"] = {"cached": {"resident_s": 256 / 10000, f"gpu_{cores}_s": 256 / 9000}}
    t = loader.targets(out)
    assert t["cached_step_images_per_s_from"] == "measured"
    assert t["gpu_over_cached_step_consumption"] == pytest.approx(1.5)
    assert t["gpu_over_decode_ceiling"] == pytest.approx(15000 / 16000)
    assert t[f"cached_step_gpu_{cores}_over_bound"] == pytest.approx(10000 / 9000)  # the step bounds it


def test_loader_timings_start_after_the_first_round_and_span_whole_rounds(monkeypatch):
    """16 workers hand over their first 16 batches at once: a timing from the first batch would count
    15 of them as free. The window opens with the second round and spans whole rounds; an epoch too
    short for that is timed from its second batch."""
    from benchmarks import loader

    monkeypatch.setitem(loader.SIZE, "n", 20_000)
    monkeypatch.setitem(loader.SIZE, "batch", 256)  # 78 batches an epoch
    assert loader.window(16, 40) == (16, 48) and loader.window(8, 40) == (8, 40) and loader.window(0, 30) == (1, 30)
    assert loader.window(16, 30) == (16, 32)
    monkeypatch.setitem(loader.SIZE, "n", 64)
    monkeypatch.setitem(loader.SIZE, "batch", 16)  # 4 batches
    assert loader.window(2, 3) == (1, 2)
    first, count = loader.window(64, 40)
    assert first + count <= 3
