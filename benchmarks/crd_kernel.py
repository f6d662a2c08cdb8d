"""CRD's contrastive loss, forward + backward, at ImageNet size: the fused Triton kernels against the
eager gather + bmm of RepDistiller's ``ContrastMemory``.

Sizes: N = 1,281,167 bank rows, d = 128, K = 16,384 noise rows a sample, B = 256. Each pass over the
gathered rows reads B (K+1) d elements: 1.07 GB in fp16, 2.1 GB in fp32; the H200's ~4.8 TB/s bound
a pass to ~0.22 ms (fp16). Cases, each timed fused and eager:

* ``scores_<bank>``: s = <memory[idx], v> and its gradient wrt v (``CRDScores`` against
  ``bmm(memory[idx], v)`` with autograd);
* ``loss_<bank>``: one direction of CRD's NCE loss (Z fixed): fused, the scores kernel, the loss and its
  gradient in float32, the gradient kernel (:class:`kcd_fast.distillers.crd.ContrastLoss`); eager,
  RepDistiller's code: ``memory[idx]``, ``bmm`` in the bank's dtype, ``ContrastLoss``, autograd;
* ``distiller_fp32``: the whole :class:`kcd_fast.distillers.crd.CRD` step (two directions, Z, the bank
  update, CE; float32 banks as in CRD; 512-wide pooled features), with ``fused`` True and False.

Time: the median over ``--reps`` calls of CUDA events around each call (its launches included).
Memory: the peak allocated during one call above what was allocated before it. Targets, for
``loss_fp16`` (the size the bound above is for): fused <= 1.5 ms, >= 3x faster than eager, and <= 10%
of eager's peak extra memory; the JSON lists them and whether each case meets them.

    python benchmarks/crd_kernel.py [--out FILE]     # needs a GPU; without one it says so and exits 0
    python benchmarks/crd_kernel.py --smoke          # tiny sizes on the CPU (the interpreter): the code paths
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # --smoke runs the kernels in Triton's interpreter
if not __package__:  # run as a file: import from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402

from kcd_fast.distillers.base import Batch  # noqa: E402
from kcd_fast.distillers.crd import CRD, ContrastLoss, CRDSettings  # noqa: E402
from kcd_fast.kernels.crd_scores import CRDScores, crd_scores_triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = dict(N=1_281_167, d=128, K=16_384, B=256, feat=512)
SMOKE = dict(N=1_000, d=16, K=63, B=8, feat=24)
NCE_T, EPS = 0.07, 1e-7
TARGETS = {"case": "loss_fp16", "fused_ms_max": 1.5, "speedup_min": 3.0, "memory_ratio_max": 0.10}


def time_ms(fn, reps: int, device: torch.device) -> float:
    """Median milliseconds of fn() over ``reps`` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mb(fn, device: torch.device) -> float | None:
    """Peak memory allocated during one fn() above what was allocated before it, in MiB (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def crd_contrast_loss_eager(x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """RepDistiller's ContrastLoss on x = exp(s / tau) / Z [B, K+1] (column 0 the positive)."""
    m = x.shape[1] - 1
    pn = 1.0 / num_samples
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + m * pn + EPS))
    log_d0 = torch.log((m * pn) / (x[:, 1:] + m * pn + EPS))
    return -(log_d1.sum() + log_d0.sum()) / x.shape[0]


def kernel_cases(sz: dict, bank_dtype: torch.dtype, device: torch.device):
    """(name, fused fn, eager fn, check fn) of the scores and the one-direction loss with a ``bank_dtype`` bank."""
    g = torch.Generator(device=device).manual_seed(0)
    memory = torch.nn.functional.normalize(torch.randn(sz["N"], sz["d"], device=device, generator=g), dim=1)
    memory = memory.to(bank_dtype)
    idx = torch.randint(0, sz["N"], (sz["B"], sz["K"] + 1), device=device, generator=g)
    v = torch.nn.functional.normalize(torch.randn(sz["B"], sz["d"], device=device, generator=g), dim=1)
    v.requires_grad_(True)
    gs = torch.randn(sz["B"], sz["K"] + 1, device=device, generator=g)
    with torch.no_grad():
        z = torch.exp(crd_scores_triton(v, memory, idx) / NCE_T).mean() * sz["N"]

    def scores_fused():
        v.grad = None
        (CRDScores.apply(v, memory, idx) * gs).sum().backward()

    def scores_eager():
        v.grad = None
        s = torch.bmm(memory[idx], v.to(bank_dtype).unsqueeze(2)).squeeze(2).float()
        (s * gs).sum().backward()

    def loss_fused():
        v.grad = None
        with torch.no_grad():
            e = torch.exp(crd_scores_triton(v, memory, idx) / NCE_T)
        loss = ContrastLoss.apply(v, e, memory, idx, z, NCE_T, sz["N"], True)
        loss.backward()
        return loss

    def loss_eager():
        v.grad = None
        s = torch.bmm(memory[idx].detach(), v.to(bank_dtype).unsqueeze(2)).squeeze(2).float()
        loss = crd_contrast_loss_eager(torch.exp(s / NCE_T) / z, sz["N"])
        loss.backward()
        return loss

    def check(fused, eager):
        out_f = fused()
        grad_f = v.grad.clone()
        out_e = eager()
        tol = 1e-4 if bank_dtype == torch.float32 else 1e-2  # eager's bmm runs in the bank's dtype
        if out_f is not None:
            torch.testing.assert_close(out_f.detach(), out_e.detach(), atol=tol, rtol=tol)
        torch.testing.assert_close(grad_f, v.grad, atol=tol * float(v.grad.abs().max()), rtol=tol)

    tag = {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}[bank_dtype]
    return [(f"scores_{tag}", scores_fused, scores_eager, check), (f"loss_{tag}", loss_fused, loss_eager, check)]


def distiller_case(sz: dict, device: torch.device):
    """(name, fused fn, eager fn, None): one training step of the CRD distiller, fused and eager."""
    settings = CRDSettings(crd_feat_dim=sz["d"], crd_nce_k=sz["K"])
    shapes = {"pooled": torch.Size([sz["B"], sz["feat"]])}
    crd = CRD(settings, shapes, shapes, num_samples=sz["N"], num_classes=1000).to(device)
    g = torch.Generator(device=device).manual_seed(1)
    pooled_s = torch.randn(sz["B"], sz["feat"], device=device, generator=g, requires_grad=True)
    student = {"pooled": pooled_s, "logits": torch.randn(sz["B"], 1000, device=device, generator=g)}
    teacher = {"pooled": torch.randn(sz["B"], sz["feat"], device=device, generator=g),
               "logits": torch.randn(sz["B"], 1000, device=device, generator=g)}
    batch = Batch(target=torch.randint(0, 1000, (sz["B"],), device=device, generator=g),
                  index=torch.randperm(sz["N"], device=device, generator=g)[:sz["B"]], epoch=0)

    def step(fused):
        def fn():
            crd.fused = fused
            crd.zero_grad(set_to_none=True)
            pooled_s.grad = None
            loss, _ = crd(student, teacher, batch)
            loss.backward()
        return fn

    return [("distiller_fp32", step(True), step(False), None)]


def measure(name, fused, eager, check, reps: int, device: torch.device, sz: dict) -> dict:
    if check is not None:
        check(fused, eager)
    row = {"case": name, "fused_ms": time_ms(fused, reps, device), "eager_ms": time_ms(eager, reps, device),
           "fused_peak_extra_mib": peak_extra_mb(fused, device), "eager_peak_extra_mib": peak_extra_mb(eager, device)}
    row["speedup"] = row["eager_ms"] / row["fused_ms"]
    if row["fused_peak_extra_mib"] is not None:
        row["memory_ratio"] = row["fused_peak_extra_mib"] / row["eager_peak_extra_mib"]
    elements = sz["B"] * (sz["K"] + 1) * sz["d"]
    size = 2 if name.endswith(("fp16", "bf16")) else 4
    passes = 4 if name.startswith("distiller") else 2
    row["fused_gathered_gb_per_s"] = passes * elements * size / (row["fused_ms"] * 1e-3) / 1e9
    row["meets_targets"] = (row["fused_ms"] <= TARGETS["fused_ms_max"] and row["speedup"] >= TARGETS["speedup_min"]
                            and row.get("memory_ratio", 0.0) <= TARGETS["memory_ratio_max"])
    print(json.dumps(row), flush=True)
    return row


def git_commit() -> dict:
    def git(*args):
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None
    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<date>-<device>-crd-kernel.json)")
    p.add_argument("--reps", type=int, default=20, help="timed calls per case")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device (checks the code paths only)")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("crd_kernel: skipped: needs a CUDA GPU (python benchmarks/crd_kernel.py --smoke runs tiny sizes "
              "on the CPU)")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sz = SMOKE if args.smoke else IMAGENET
    cases = kernel_cases(sz, torch.float16, device) + kernel_cases(sz, torch.float32, device)
    cases += distiller_case(sz, device)
    rows = [measure(*case, reps=2 if args.smoke else args.reps, device=device, sz=sz) for case in cases]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    now = datetime.datetime.now()
    result = {"date": now.isoformat(timespec="seconds"), "device": name, "torch": torch.__version__,
              "triton": triton.__version__, "git": git_commit(), "sizes": sz, "smoke": args.smoke,
              "targets": TARGETS, "results": rows,
              "targets_met": next(r["meets_targets"] for r in rows if r["case"] == TARGETS["case"])}
    if args.smoke and not args.out:  # a smoke run measures nothing: it writes only where told to
        print(json.dumps({"smoke": True, "cases": [r["case"] for r in rows]}))
        return 0
    out = args.out or ROOT / "benchmarks" / "results" / f"{now:%Y-%m-%dT%H%M}-{name.replace(' ', '_')}-crd-kernel.json"
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"crd_kernel: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
