"""The GPU check's acceptance bounds, read from one results folder: each bound, what was measured and
whether it holds.

    python -m benchmarks.verdict benchmarks/results/<date>T<time>-<gpu>-distillers-loader

It reads what the folder holds of ``tests.log`` (the correctness verdict: timings of a build whose
tests fail are not evidence), ``crd_kernel.json``, ``distiller_step.json``,
``lightning_callback_step.json`` and ``loader.json``, prints one line per bound and writes nothing.
A figure with no bound (a distiller's step against KD's, a fed step of the ``pil`` loader) is printed
as ``info``. Exit status: 1 if a bound fails, 0 otherwise; a file that is absent, a smoke run's, one
measured on the CPU or one cut before it held a figure is named as not measured.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks.crd_kernel import TARGETS as CRD_TARGETS
from benchmarks.distiller_step import TAPS_MAX_OVERHEAD

CALLBACK_MAX_OVERHEAD_PCT = 0.1  # the Lightning callback's share of the step
GPU_LOADER_MIN_OVER_CACHED_STEP = 1.2  # the GPU loader alone against the cached step's consumption...
GPU_LOADER_MIN_OVER_CEILING = 0.9  # ...or, where nvJPEG cannot reach that, against its decode ceiling
FED_STEP_MAX_OVER_BOUND = 1.05  # a fed step against max(resident step, the loader's time per batch)
RUN_MAX_RATIO_TO_KD = {"kcd": 0.85, "kcd_cached": 0.62}  # whole runs on JPEG files with the GPU loader


def row(source: str, bound: str, measured, holds) -> dict:
    """One line of the verdict; ``holds`` True, False or None (a figure without a bound, or, with
    ``measured`` None, a bound its file holds no figure for)."""
    return {"source": source, "bound": bound, "measured": measured, "holds": holds}


def correctness(text: str) -> list:
    last = text.strip().splitlines()[-1] if text.strip() else ""
    return [row("tests.log", "the GPU correctness tests pass", last, last == "VERDICT: correctness passed")]


def crd_kernel(result: dict) -> list:
    r = next(r for r in result["results"] if r["case"] == CRD_TARGETS["case"])
    case = f"CRD loss {r['case']}"
    return [row("crd_kernel.json", f"{case}: fused forward + backward <= {CRD_TARGETS['fused_ms_max']} ms",
                f"{r['fused_ms']:.3f} ms", r["fused_ms"] <= CRD_TARGETS["fused_ms_max"]),
            row("crd_kernel.json", f"{case}: >= {CRD_TARGETS['speedup_min']}x gather + bmm",
                f"{r['speedup']:.2f}x", r["speedup"] >= CRD_TARGETS["speedup_min"]),
            row("crd_kernel.json", f"{case}: <= {CRD_TARGETS['memory_ratio_max']:.0%} of its peak extra memory",
                f"{r['memory_ratio']:.1%}", r["memory_ratio"] <= CRD_TARGETS["memory_ratio_max"])]


def distiller_step(result: dict) -> list:
    taps = result["taps_overhead"]["measured"]
    rows = [row("distiller_step.json", f"the taps add <= {TAPS_MAX_OVERHEAD:.0%} to KD's step", f"{taps:+.2%}",
                taps <= TAPS_MAX_OVERHEAD)]
    for name, arm in result["arms"].items():
        if name not in ("kd", "kd_tapped"):
            rows.append(row("distiller_step.json", f"{name}'s step against KD's", f"{arm['vs_kd']:.3f}x", None))
    return rows


def lightning_callback(result: dict) -> list:
    pct = result["overhead_pct"]
    return [row("lightning_callback_step.json", f"the callback adds <= {CALLBACK_MAX_OVERHEAD_PCT}% to the step",
                f"{pct:+.3f}%", pct <= CALLBACK_MAX_OVERHEAD_PCT)]


def loader(result: dict) -> list:
    t, rows = result["targets"], []
    gpu_loader = (f"GPU loader >= {GPU_LOADER_MIN_OVER_CACHED_STEP}x the cached step's consumption, or >= "
                  f"{GPU_LOADER_MIN_OVER_CEILING:.0%} of nvJPEG's ceiling")
    if "gpu_over_decode_ceiling" in t:
        over_step, over_ceiling = t["gpu_over_cached_step_consumption"], t["gpu_over_decode_ceiling"]
        # the step's figure: measured in the same run, or (a loader.json cut before its steps) the documented one
        step = (f" of {t['cached_step_images_per_s']:.0f} ({t['cached_step_images_per_s_from']})"
                if "cached_step_images_per_s" in t else "")
        rows.append(row("loader.json", gpu_loader,
                        f"{t['gpu_loader_images_per_s']:.0f} images/s: {over_step:.2f}x{step}, {over_ceiling:.1%}",
                        over_step >= GPU_LOADER_MIN_OVER_CACHED_STEP or over_ceiling >= GPU_LOADER_MIN_OVER_CEILING))
    else:
        rows.append(row("loader.json", gpu_loader, None, None))
    if not any(re.fullmatch(r"\w+_step_gpu_\d+w_over_bound", key) for key in t):
        rows.append(row("loader.json", f"steps fed by gpu within {FED_STEP_MAX_OVER_BOUND - 1:.0%} of their bound",
                        None, None))
    for key, value in t.items():
        m = re.fullmatch(r"(kd|cached)_step_(\w+?)_(\d+)w_over_bound", key)
        if m:
            bounded = m[2] == "gpu"
            rows.append(row("loader.json", f"{m[1]} step fed by {m[2]} ({m[3]} workers) within "
                            f"{FED_STEP_MAX_OVER_BOUND - 1:.0%} of its bound", f"{value:.3f}x",
                            value <= FED_STEP_MAX_OVER_BOUND if bounded else None))
    for name, limit in RUN_MAX_RATIO_TO_KD.items():
        run = t.get("runs_gpu", {}).get(name)
        bound = f"{name} run on JPEG files <= {limit}x KD's training time"
        if run is None:
            rows.append(row("loader.json", bound, None, None))
        else:
            rows.append(row("loader.json", bound, f"{run['ratio_to_kd']:.3f}x at C {run['C']:.3f}",
                            run["ratio_to_kd"] <= limit))
    return rows


READERS = {"tests.log": correctness, "crd_kernel.json": crd_kernel, "distiller_step.json": distiller_step,
           "lightning_callback_step.json": lightning_callback, "loader.json": loader}


def verdict(folder: Path) -> tuple[list, list]:
    """(the rows of every file present and measured, the names of those that are not)."""
    rows, missing = [], []
    for name, read in READERS.items():
        path = folder / name
        if not path.is_file():
            missing.append(f"{name}: absent")
            continue
        if name == "tests.log":
            rows += read(path.read_text())
            continue
        result = json.loads(path.read_text())
        if result.get("smoke"):
            missing.append(f"{name}: a smoke run, not a measurement")
            continue
        if str(result.get("device", "")).startswith("cpu"):
            missing.append(f"{name}: measured on the CPU, where its GPU bounds do not apply")
            continue
        try:
            rows += read(result)
        except (KeyError, StopIteration, TypeError) as e:  # a run cut before it wrote this figure
            missing.append(f"{name}: incomplete (no {e!s})")
    return rows, missing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="a results folder of benchmarks/gpu_check.sh")
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        p.error(f"folder: expected a results folder of benchmarks/gpu_check.sh, got {args.folder}")
    rows, missing = verdict(args.folder)
    for r in rows:
        if r["measured"] is None:
            print(f"not measured  {r['bound']}  ({r['source']})")
            continue
        mark = {True: "holds", False: "FAILS", None: "info "}[r["holds"]]
        print(f"{mark}  {r['bound']}: {r['measured']}  ({r['source']})")
    for m in missing:
        print(f"not measured  {m}")
    return 1 if any(r["holds"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
