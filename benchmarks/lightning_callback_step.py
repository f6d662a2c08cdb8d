"""What ``KCDCallback`` costs in a Lightning KD step: the same Trainer loop with and without it.

ResNet34 -> ResNet18 KD (0.1 CE + 0.9 KL at T = 4, the trainer's ``kd`` loss), batch 256, 224x224,
``precision="bf16-mixed"``, channels_last, on one CUDA GPU. The images live on the GPU (5,120 of them,
read as index mod 5,120, so that no loader hides anything); the callback's condenser holds N =
1,281,167 samples, ImageNet's. Both arms run the same LightningModule, DataLoader pipeline and batch
count; only the sampler (``KCDCallback.sampler()`` or a RandomSampler) and the callback differ. Per
step with the callback: finding the indices and logits, ``observe`` (Eq. 7 + 12: one fused kernel, no
host sync) and the count for C.

* ``step_ms``: the wall time per step from the start of batch ``--warmup`` to the end of the last
  one, the device synchronised at both ends; one value per repeat, the arms alternating;
* ``stage_end_ms``: the callback's ``on_train_epoch_end`` at the epoch's end, a stage end (the
  ranking of Eq. 13 over N, VAKS pairs, the logged numbers), synchronised.

    python benchmarks/lightning_callback_step.py --out lightning_callback_step.json
    python benchmarks/lightning_callback_step.py --smoke     # the CPU path of this script, tiny sizes

Without CUDA (and without ``--smoke``) it says so and exits with status 0.
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
from types import SimpleNamespace

import torch

GPU = dict(teacher="resnet34", student="resnet18", batch=256, image=224, channels=3, classes=1000,
           n=1_281_167, resident=5120, precision="bf16-mixed")
SMOKE = dict(teacher="cnn_large", student="cnn_small", batch=32, image=28, channels=1, classes=10,
             n=50_000, resident=256, precision="32-true")
LOSS = SimpleNamespace(kd_temperature=4.0, ce_weight=0.1, kd_weight=0.9)  # the trainer's kd defaults


class ResidentImages(torch.utils.data.Dataset):
    """N samples backed by ``resident`` images on the device: sample i is image i mod resident.
    ``__getitems__`` gathers a whole batch in one indexing op (the DataLoader then passes it as is)."""

    def __init__(self, cfg: dict, device: torch.device):
        g = torch.Generator(device=device).manual_seed(0)
        shape = (cfg["resident"], cfg["channels"], cfg["image"], cfg["image"])
        self.x = torch.randn(shape, generator=g, device=device).contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, cfg["classes"], (cfg["resident"],), generator=g, device=device)
        self.n, self.device = cfg["n"], device

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices):
        # From pinned memory, without blocking: a pageable copy would wait for the queued steps every step.
        index = torch.as_tensor(indices, dtype=torch.int64)
        if self.device.type == "cuda":
            index = index.pin_memory().to(self.device, non_blocking=True)
        slot = index % self.x.shape[0]
        return self.x[slot], self.y[slot], index


def as_is(batch):
    return batch


def make_module(cfg: dict):
    import lightning as L

    from kcd_fast import distill
    from kcd_fast.models import build_model

    class KD(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.student = build_model(cfg["student"], cfg["classes"], cfg["channels"]).to(
                memory_format=torch.channels_last)
            self.teacher = build_model(cfg["teacher"], cfg["classes"], cfg["channels"]).to(
                memory_format=torch.channels_last).eval().requires_grad_(False)

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            logits = self.student(x)
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            return {"loss": distill.kd_loss(logits, teacher_logits, y, LOSS, 0), "logits": logits}

        def configure_optimizers(self):
            return torch.optim.SGD(self.student.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

        def train(self, mode: bool = True):
            super().train(mode)
            self.teacher.eval()
            return self

    return KD()


def clocks(sync, first: int, last: int):
    """Callbacks: one that times steps first..last, and two that bracket the callbacks between them at the
    epoch's end."""
    from lightning.pytorch.callbacks import Callback

    class StepClock(Callback):
        step_ms = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == first:
                sync()
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == last:
                sync()
                self.step_ms = (time.perf_counter() - self.t0) * 1e3 / (last - first + 1)

    class EpochEndMark(Callback):
        at = None

        def on_train_epoch_end(self, trainer, pl_module):
            sync()
            self.at = time.perf_counter()

    return StepClock(), EpochEndMark(), EpochEndMark()


def run_arm(cfg, module, data, with_callback: bool, args, sync) -> dict:
    """One fit of one epoch of warmup + steps batches; returns its step time (and stage end, with KCD)."""
    import lightning as L
    from torch.utils.data import DataLoader, RandomSampler

    from kcd_fast.integrations.lightning import KCDCallback

    step_clock, before, after = clocks(sync, args.warmup, args.warmup + args.steps - 1)
    callbacks = [step_clock]
    if with_callback:
        kcd = KCDCallback(cfg["n"], stage_epochs=1, epochs=1)
        sampler = kcd.sampler()
        callbacks = [before, kcd, step_clock, after]
    else:
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(data, batch_size=cfg["batch"], sampler=sampler, collate_fn=as_is, drop_last=True)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=args.warmup + args.steps, accelerator=args.accelerator,
                        devices=1, precision=cfg["precision"], callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    out = {"step_ms": step_clock.step_ms}
    if with_callback:
        out["stage_end_ms"] = (after.at - before.at) * 1e3
    return out


def versions() -> dict:
    import lightning

    import kcd_fast

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except OSError:
        commit = None
    return {"torch": torch.__version__, "lightning": lightning.__version__, "kcd_fast": kcd_fast.__version__,
            "commit": commit}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=10, help="steps before the timed ones")
    p.add_argument("--repeats", type=int, default=3, help="fits per arm, the arms alternating")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks this script, measures nothing")
    p.add_argument("--out", default=None, help="write the JSON here")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("lightning_callback_step: skipped: it measures a step on a CUDA GPU and none is visible "
              "(--smoke runs its CPU path)")
        return 0
    cfg, device = (SMOKE, torch.device("cpu")) if args.smoke else (GPU, torch.device("cuda"))
    args.accelerator = device.type if device.type == "cpu" else "gpu"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.backends.cudnn.benchmark = True
    module, data = make_module(cfg), ResidentImages(cfg, device)
    runs = {"without": [], "with": []}
    stage_end = []
    for _ in range(args.repeats):
        for arm in ("without", "with"):
            r = run_arm(cfg, module, data, arm == "with", args, sync)
            runs[arm].append(round(r["step_ms"], 4))
            if "stage_end_ms" in r:
                stage_end.append(round(r["stage_end_ms"], 3))
    median = {arm: statistics.median(v) for arm, v in runs.items()}
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke: not a measurement)",
           **versions(), "config": cfg | {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats},
           "step_ms": runs, "median_step_ms": median,
           "overhead_pct": round(100.0 * (median["with"] / median["without"] - 1.0), 3),
           "stage_end_ms": stage_end, "smoke": args.smoke}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
