"""Where a stage end's time goes: the cached run's E-step (``end_epoch`` at a boundary, then VAKS in the
knowledge buffer) at ``wall_ratio``'s size, timed and then profiled op by op.

A stage end in ``wall_ratio``'s cached run at N = 5,120 takes a few ms, far more than its GPU work
(docs/performance.md: on an H200, 2026-11-27, 2.5-4.6 ms in the trainer, of which about 0.22 ms is
device time). This script says which ops and syncs hold the host's time. It builds the condenser and buffer as the trainer does (30 epochs, T = 5, random
entropies recorded in batches of 256), ends every epoch, and reports:

* ``stage_end_ms``: the wall time of each stage end (end_epoch + mix_, then a device sync), as the
  trainer's ``estep_time`` measures it;
* ``profile``: the ops of one more run's stage ends under ``torch.profiler`` (host time, device time
  and calls, the heaviest first).

    python benchmarks/stage_end_profile.py --out stage_end.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from kcd_fast import KnowledgeCondenser
from kcd_fast.knowledge import KnowledgeBuffer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _recorded(n: int, classes: int, epochs: int, stage_epochs: int, seed: int):
    """A condenser and a filled dense fp16 buffer, with one epoch of entropies recorded."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    cond = KnowledgeCondenser(n, epochs=epochs, stage_epochs=stage_epochs, device=DEVICE)
    kb = KnowledgeBuffer(n, classes, dtype=torch.float16, temperature=4.0, device=DEVICE)
    kb.write(torch.arange(n, device=DEVICE), torch.randn(n, classes, generator=g, device=DEVICE))
    order = torch.randperm(n, generator=g, device=DEVICE)
    for i in order.split(256):
        cond.observe(i, torch.randn(i.numel(), classes, generator=g, device=DEVICE) * 3)
    return cond, kb


def _stage_ends(cond, kb, epochs):
    """End every epoch; returns each boundary's wall time (end_epoch + mix_ + sync), in ms."""
    times = []
    for epoch in range(epochs):
        _sync()
        t0 = time.perf_counter()
        plan = cond.end_epoch(epoch)
        if plan is not None and plan.k1l.numel():
            kb.mix_(plan.k1l, plan.k0, plan.eps)
        _sync()
        if plan is not None:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5120, help="samples (wall_ratio's N)")
    p.add_argument("--classes", type=int, default=1000 if DEVICE.type == "cuda" else 10)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--stage-epochs", type=int, default=5)
    p.add_argument("--rows", type=int, default=30, help="ops listed in the profile")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    shape = (args.n, args.classes, args.epochs, args.stage_epochs)
    _stage_ends(*_recorded(*shape, seed=0), args.epochs)  # warm-up: kernels loaded, allocator filled
    timed = _stage_ends(*_recorded(*shape, seed=1), args.epochs)
    cond, kb = _recorded(*shape, seed=2)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        _stage_ends(cond, kb, args.epochs)
    device_key = "device_time_total" if DEVICE.type == "cuda" else None
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[: args.rows]:
        rows.append({"op": e.key, "calls": e.count, "self_cpu_us": round(e.self_cpu_time_total, 1),
                     "cpu_total_us": round(e.cpu_time_total, 1),
                     "device_us": round(getattr(e, device_key, 0.0), 1) if device_key else None})
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", "torch": torch.__version__,
           "config": vars(args) | {"stage_ends": len(timed)}, "stage_end_ms": [round(t, 3) for t in timed],
           "profile": rows}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("device", "stage_end_ms")}))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
