"""Accuracy cost of cached knowledge: the same KCD run (same seed, same teacher, same C) with the
teacher online and with its soft labels cached, on real data. CPU-sized; writes a JSON summary.

    python benchmarks/accuracy_cached_vs_online.py --dataset digits --seeds 0 1 2 --out results.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
from pathlib import Path

import torch

from kcd_fast.train import options
from kcd_fast.train.main import main as run_trainer


def run(dataset, seed, knowledge, teacher, out, storage="dense", k=10):
    argv = ["--dataset", dataset, "--seed", str(seed), "--knowledge", knowledge, "--no-progress", "--no-plots",
            "--output-dir", str(out)]
    if knowledge == "cached":  # the storage options apply to cached knowledge only (the trainer names them otherwise)
        argv += ["--storage", storage] + (["--topk", str(k)] if storage == "topk" else [])
    if teacher:
        argv += ["--teacher-weights", str(teacher)]
    return run_trainer(options.get_args_parser().parse_args(argv))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--topk", type=int, default=3, help="k of the top-k runs (< the class count, or it is lossless)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            base = Path(tmp) / f"s{seed}"
            online = run(args.dataset, seed, "online", None, base / "online")
            (teacher,) = (base / "online").glob("teacher-*.pth")
            for mode, storage in (("cached", "dense"), ("cached", "topk")):
                cached = run(args.dataset, seed, mode, teacher, base / f"{mode}-{storage}", storage, args.topk)
                rows.append({"seed": seed, "storage": storage if storage == "dense" else f"top{args.topk}", "online_final": online["final_top1"],
                             "cached_final": cached["final_top1"], "online_best": online["best_top1"],
                             "cached_best": cached["best_top1"], "C_online": online["C"], "C_cached": cached["C"],
                             "teacher_passes_online": online["teacher_passes"],
                             "teacher_passes_cached": cached["teacher_passes"],
                             "wall_online_s": online["wall_time_s"], "wall_cached_s": cached["wall_time_s"]})
                print(json.dumps(rows[-1]), flush=True)
    summary = {"dataset": args.dataset, "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": rows}
    for storage in ("dense", f"top{args.topk}"):
        sel = [r for r in rows if r["storage"] == storage]
        summary[f"mean_final_delta_{storage}"] = statistics.mean(r["cached_final"] - r["online_final"] for r in sel)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
