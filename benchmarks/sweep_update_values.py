"""Device time of the update_values kernel per launch configuration.

Times, by CUDA-graph replay of 100 calls (launch cost excluded, as in
benchmarks/test_ops.py::test_update_values_device_time), the kernel with each num_warps on each
of its paths (one tile where the row and the batch's indices fit one, and chunked), with
vectorised (16-byte) row loads, plus the default without them as a control, and the eager
baseline. Every configuration is first checked against the float64 reference (kcd_fast.reference).
benchmarks/codegen_update_values.py shows what each compiles to (loads, barriers, instructions)
without a GPU.

Two floors are timed the same way, to show how much of the kernel's time any kernel of its shape
pays: B programs that only store one float each ("launch"), and B programs that load their row
as the default path does (one block, or chunks) and store its sum ("row sum", one block
reduction per block).

    python -m benchmarks.sweep_update_values --out sweep.json          # needs a GPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # --device cpu: Triton reads this when first imported (below), so set it before, as the tests' conftest does.
    os.environ.setdefault("TRITON_INTERPRET", "1")
if not __package__:  # run as a file (python benchmarks/sweep_update_values.py): import from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmarks import baselines  # noqa: E402
from benchmarks.conftest import capture_graph  # noqa: E402
from kcd_fast import reference as R  # noqa: E402
from kcd_fast.kernels.update_values import launch_config, one_tile, update_values_triton  # noqa: E402

CALLS = 100


@triton.jit(do_not_specialize=["C"])
def _floor_kernel(x_ptr, stride_b, C, out_ptr, BLOCK_C: tl.constexpr, LOAD_ROW: tl.constexpr,
                  CHUNKED: tl.constexpr, VEC: tl.constexpr):
    """Program b writes out[b]: 0 (LOAD_ROW False), or the sum of row b of x [B, C] (unit class stride),
    loaded VEC elements at a time as update_values loads it: in one block of BLOCK_C >= C, or in
    BLOCK_C-wide chunks (CHUNKED)."""
    C = (C // VEC) * VEC
    stride_b = (stride_b // VEC) * VEC
    row = tl.program_id(0).to(tl.int64)
    if LOAD_ROW:
        offs = tl.arange(0, BLOCK_C)
        if CHUNKED:
            total = tl.zeros((), tl.float32)
            for c0 in range(0, C, BLOCK_C):
                x = tl.load(x_ptr + row * stride_b + c0 + offs, mask=c0 + offs < C, other=0.0).to(tl.float32)
                total += tl.sum(x, axis=0)
        else:
            x = tl.load(x_ptr + row * stride_b + offs, mask=offs < C, other=0.0).to(tl.float32)
            total = tl.sum(x, axis=0)
        tl.store(out_ptr + row, total)
    else:
        tl.store(out_ptr + row, 0.0)


def floor(logits: torch.Tensor, out: torch.Tensor, load_row: bool) -> torch.Tensor:
    config = launch_config(logits)  # the default update_values launch's path, block, vector width and warps
    _floor_kernel[(logits.shape[0],)](logits, logits.stride(0), logits.shape[1], out, BLOCK_C=config["BLOCK_C"],
                                      LOAD_ROW=load_row, CHUNKED=config["TILE"] == 0, VEC=config["VEC"],
                                      num_warps=config["num_warps"])
    return out


def device_time_us(fn, reps: int = 30) -> float:
    """Median over ``reps`` replays of one graph of CALLS calls, per call, in µs."""
    graph = capture_graph(fn, CALLS)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS)
    return statistics.median(times)


def _path(tile: bool | None) -> str:
    return "-" if tile is None else "one tile" if tile else "chunked"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--n", type=int, default=1_281_167)
    p.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", help="cpu runs the checks in Triton's interpreter")
    p.add_argument("--check-only", action="store_true", help="check each configuration, time nothing")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    values = (torch.rand(args.n, generator=g) * 4).to(dev)
    counts = torch.randint(1, 15, (args.n,), generator=g, dtype=torch.int32).to(dev)
    idx = torch.randperm(args.n, generator=g)[: args.batch].to(dev)
    # The timed calls record into copies: `values` and `counts` stay the state that every
    # configuration's check starts from and the reference is computed from.
    values_t, counts_t = values.clone(), counts.clone()
    paths = (True, False) if one_tile(args.batch, args.classes) else (False,)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(args.batch, args.classes, generator=g) * 3).to(dev, dtype)
        flag = torch.zeros(1, dtype=torch.int32, device=dev)
        ent_ref = R.entropy(logits.cpu().float(), 1.0)
        v_ref, f_ref = R.record_values(values.cpu(), counts.cpu(), idx.cpu(), ent_ref)
        default = launch_config(logits)
        default_tile = default["TILE"] > 0
        # Every path at every width, vectorised, and the default without 16-byte loads, as a control.
        configs = [(w, tile, True) for tile in paths for w in args.warps]
        configs.append((default["num_warps"], default_tile, False))
        for w, tile, vec in configs:
            row = {"dtype": str(dtype)[6:], "provider": "kcd_fast", "num_warps": w, "tile": tile,
                   "vectorize": vec, "row_vector_width": launch_config(logits, vectorize=vec)["VEC"],
                   "default": w == default["num_warps"] and tile == default_tile and vec}
            try:  # against the float64 reference; one broken configuration must not cost the others' timings
                v, f = values.clone(), counts.clone()
                out = update_values_triton(v, f, idx, logits, 1.0, flag, num_warps=w, tile=tile, vectorize=vec)
                torch.testing.assert_close(out.cpu().double(), ent_ref, atol=2e-5, rtol=2e-5)
                torch.testing.assert_close(v.cpu().double(), v_ref, atol=2e-5, rtol=2e-5)
                assert torch.equal(f.cpu().long(), f_ref), "counts differ from the reference's"
            except Exception as e:  # noqa: BLE001 (reported in the row and by the exit status)
                rows.append(dict(row, checked=False, error=f"{type(e).__name__}: {e}"[:500]))
                print(f"CHECK FAILED: {rows[-1]}", flush=True)
                continue
            if args.check_only:
                rows.append(dict(row, checked=True))
                continue
            row["checked"] = True
            row["device_us"] = device_time_us(lambda w=w, tile=tile, vec=vec: update_values_triton(
                values_t, counts_t, idx, logits, 1.0, flag, num_warps=w, tile=tile, vectorize=vec))
            rows.append(row)
        out = torch.full((args.batch,), float("nan"), device=dev)
        assert torch.equal(floor(logits, out, False), torch.zeros_like(out))
        torch.testing.assert_close(floor(logits, out, True), logits.float().sum(1), atol=1e-3, rtol=1e-4)
        if args.check_only:
            continue
        for name, load_row in (("floor: launch", False), ("floor: row sum", True)):
            rows.append({"dtype": str(dtype)[6:], "provider": name, "num_warps": default["num_warps"],
                         "tile": None, "vectorize": None, "row_vector_width": None, "default": False,
                         "device_us": device_time_us(lambda lr=load_row: floor(logits, out, lr))})
        t = device_time_us(lambda: baselines.eager_update_values(values_t, counts_t, idx, logits))
        rows.append({"dtype": str(dtype)[6:], "provider": "eager", "num_warps": None, "tile": None,
                     "vectorize": None, "row_vector_width": None, "default": False, "device_us": t})
    failed = [r for r in rows if r.get("checked") is False]
    if args.check_only:
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=2))
        print(f"checked {len(rows)} configurations against the float64 reference: {len(failed)} failed")
        return len(failed)
    for r in rows:
        if "device_us" not in r:
            print(f"{r['dtype']:>8} {r['provider']:>14} warps={r['num_warps']} {_path(r['tile'])}: "
                  f"not timed, its check failed")
            continue
        eager = next(x["device_us"] for x in rows if x["dtype"] == r["dtype"] and x["provider"] == "eager")
        r["eager_over_this"] = eager / r["device_us"]
        print(f"{r['dtype']:>8} {r['provider']:>14} warps={str(r['num_warps']):>4}"
              f" {_path(r['tile']):>8} vec={str(r['row_vector_width']):>4}"
              f"{' (default)' if r['default'] else '':10}"
              f" {r['device_us']:7.2f} us  eager/this = {r['eager_over_this']:.2f}x")
    Path(args.out).write_text(json.dumps({
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "B": args.batch, "C": args.classes, "N": args.n,
        "calls_per_graph": CALLS, "rows": rows}, indent=2))
    return len(failed)


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
