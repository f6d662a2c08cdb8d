"""The training step of each distiller against KD's, ResNet34 -> ResNet18 at batch 256, and what the
feature taps alone add to KD's step.

Each arm is the trainer's step (:func:`kcd_fast.train.engine.train_one_epoch`'s body): the teacher
forward under no_grad, the student forward, the loss, backward and SGD, with bf16 autocast and
channels_last on device-resident random images. Arms:

* ``kd``: the logit loss (the fused kernel on CUDA);
* ``kd_tapped``: the same loss, with ReviewKD's taps hooked on both networks (the most any method
  reads: every stage, pre-ReLU on the teacher, and ``pooled``): the cost of the hooks alone;
* ``fitnet``, ``at``, ``pkt``, ``crd``, ``reviewkd``, ``sskd``: each method with its ImageNet defaults,
  CRD's banks over N = 1,281,167 samples; SSKD's step runs both networks on its four rotated views
  of the batch (its teacher phase, before the student's, is not timed).

Time: the median over repeats of the mean step over ``--steps`` steps (CUDA-synchronised at each
end); arms alternate within each repeat so that clock drift affects them alike. Targets: the taps
add <= 1% to KD's step (``kd_tapped`` / ``kd``).

    python benchmarks/distiller_step.py [--out FILE]   # needs a GPU; without one it says so and exits 0
    python benchmarks/distiller_step.py --smoke        # tiny sizes on the CPU: checks this script only
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

if not __package__:  # run as a file: import from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kcd_fast import distill, distillers  # noqa: E402
from kcd_fast.distillers import Batch  # noqa: E402
from kcd_fast.models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = dict(batch=256, image=224, classes=1000, samples=1_281_167, teacher="resnet34", student="resnet18")
SMOKE = dict(batch=4, image=32, classes=10, samples=64, teacher="resnet34", student="resnet18")
ARMS = ("kd", "kd_tapped", "fitnet", "at", "pkt", "crd", "reviewkd", "sskd")
TAPS_MAX_OVERHEAD = 0.01


def make_arm(name: str, size: dict, device: torch.device):
    """(step function, the modules it trains) of one arm, on fresh networks seeded alike."""
    torch.manual_seed(0)
    student = build_model(size["student"], size["classes"], 3).to(device, memory_format=torch.channels_last)
    teacher = build_model(size["teacher"], size["classes"], 3).to(device, memory_format=torch.channels_last)
    teacher.eval().requires_grad_(False)
    sample = torch.zeros(2, 3, size["image"], size["image"], device=device)
    method = "reviewkd" if name == "kd_tapped" else name
    built = distillers.build_distiller(method, distillers.default_settings(method, "imagenet"), student, teacher,
                                       sample, num_samples=size["samples"], num_classes=size["classes"])
    kd_settings = distill.KDSettings()
    params = list(student.parameters()) + list(built.distiller.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step(x, y, index, epoch):
        # the batch itself, but for SSKD's rotations (channels_last again, as the trainer's step makes them)
        x = built.distiller.views(x).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            if name in ("kd", "kd_tapped"):
                loss = distill.kd_loss(s_logits, t_logits, y, kd_settings, epoch)
            else:
                s_out = {"logits": s_logits, **built.student_taps.values}
                t_out = {"logits": t_logits, **(built.teacher_taps.values if built.teacher_taps else {})}
                loss, _ = built.distiller(s_out, t_out, Batch(y, index, epoch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(size: dict, device: torch.device, arms, steps: int, warmup: int, repeats: int) -> dict:
    x = torch.randn(size["batch"], 3, size["image"], size["image"], device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, size["classes"], (size["batch"],), device=device)
    index = torch.randint(0, size["samples"], (size["batch"],), device=device)
    step_fns = {name: make_arm(name, size, device) for name in arms}
    for fn in step_fns.values():
        for _ in range(warmup):
            fn(x, y, index, 0)
    per_step = {name: [] for name in arms}
    for _ in range(repeats):
        for name, fn in step_fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn(x, y, index, 0)
            sync(device)
            per_step[name].append((time.perf_counter() - t0) / steps * 1e3)
    return {name: {"step_ms": statistics.median(v), "repeats_ms": v} for name, v in per_step.items()}


def versions() -> dict:
    import triton

    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or None
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
            "torch": torch.__version__, "triton": triton.__version__,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks this script, measures nothing")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("distiller_step: skipped: needs a CUDA GPU (--smoke runs tiny sizes on the CPU)")
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    size = SMOKE if args.smoke else IMAGENET
    steps, warmup, repeats = (1, 1, 1) if args.smoke else (args.steps, args.warmup, args.repeats)
    arms = measure(size, device, args.arms, steps, warmup, repeats)
    result = {**versions(), "size": size, "steps": steps, "repeats": repeats, "arms": arms, "smoke": args.smoke}
    if "kd" in arms:
        for name, arm in arms.items():
            arm["vs_kd"] = arm["step_ms"] / arms["kd"]["step_ms"]
        if "kd_tapped" in arms:
            overhead = arms["kd_tapped"]["vs_kd"] - 1
            result["taps_overhead"] = {"measured": overhead, "max": TAPS_MAX_OVERHEAD,
                                       "met": overhead <= TAPS_MAX_OVERHEAD}
    for name, arm in arms.items():
        print(f"{name:10s} {arm['step_ms']:9.2f} ms" + (f"  {arm['vs_kd']:.3f}x KD" if "vs_kd" in arm else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
