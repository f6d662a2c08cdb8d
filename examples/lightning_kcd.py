"""KD with KCD in a Lightning run, on scikit-learn's digits: about 15 s on 2 CPU cores.

A teacher (``cnn_large``) is trained first with plain cross-entropy; the student (``cnn_small``) is
then distilled by ``lightning.Trainer`` with ``KCDCallback``, which records the student's entropies
each step (Eq. 7, 12), condenses the training set at each stage end (Eq. 13) with VAKS on the
inputs (Eq. 14-15), and feeds the condensed set back through its sampler.

    python examples/lightning_kcd.py                      # 12 epochs in 6 stages of 2
    python examples/lightning_kcd.py --epochs 4 --stage-epochs 2 --teacher-epochs 2
    python examples/lightning_kcd.py --devices 2          # DDP on 2 CPU processes (gloo)

The lines KCD adds to an ordinary Lightning KD run are marked ``# KCD``.
"""
import argparse
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kcd_fast.data import build_datasets
from kcd_fast.distill import kl_distill
from kcd_fast.integrations.lightning import KCDCallback
from kcd_fast.models import build_model


class KDStudent(L.LightningModule):
    """0.1 CE + 0.9 KL at T = 4 against a frozen teacher (Eq. 1); returns the student's logits too."""

    def __init__(self, teacher: torch.nn.Module, lr: float, epochs: int):
        super().__init__()
        self.student = build_model("cnn_small", 10, 1)
        self.teacher = teacher.eval().requires_grad_(False)
        self.lr, self.epochs = lr, epochs

    def training_step(self, batch, batch_idx):
        x, y, index = batch                                   # KCD: the dataset returns its indices
        logits = self.student(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        loss = 0.1 * F.cross_entropy(logits, y) + 0.9 * kl_distill(logits, teacher_logits, 4.0)
        return {"loss": loss, "logits": logits}               # KCD: the callback reads "logits"

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_top1", (self.student(x).argmax(1) == y).float().mean() * 100, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.student.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.epochs)]

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher's BatchNorm keeps its statistics
        return self


def train_teacher(bundle, epochs: int, seed: int) -> torch.nn.Module:
    """cnn_large with cross-entropy, in a plain loop."""
    torch.manual_seed(seed + 1)
    teacher = build_model("cnn_large", bundle.num_classes, bundle.in_channels)
    opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(bundle.train, batch_size=64, shuffle=True, drop_last=True)
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(teacher(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return teacher.eval()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=12, help="I, the student's epochs")
    p.add_argument("--stage-epochs", type=int, default=2, help="T, the epochs of one KCD stage")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--rho", type=float, default=0.7, help="the final kept fraction")
    p.add_argument("--devices", type=int, default=1, help="CPU processes (more than 1: DDP on gloo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process: the models are tiny, and one thread does not fight others")
    args = p.parse_args(argv)
    start = time.time()
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    bundle = build_datasets("digits")
    teacher = train_teacher(bundle, args.teacher_epochs, args.seed)

    kcd = KCDCallback(len(bundle.train), stage_epochs=args.stage_epochs, rho=args.rho, seed=args.seed)  # KCD
    train_loader = DataLoader(kcd.dataset(bundle.train), batch_size=64, drop_last=True,                 # KCD
                              sampler=kcd.sampler())                                                   # KCD
    val_loader = DataLoader(bundle.val, batch_size=256)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto", callbacks=[kcd],             # KCD
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(KDStudent(teacher, lr=0.05, epochs=args.epochs), train_loader, val_loader)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        for stage in kcd.condenser.history:
            print(f"stage {stage['stage']} (end of epoch {stage['epoch']}): kept {stage['kept']} of "
                  f"{kcd.num_samples}, {stage['k1l']} mixed with dropped points (VAKS)")
        print(f"lightning_kcd: done in {time.time() - start:.1f}s: student top-1 {metrics['val_top1']:.2f}%, "
              f"measured C {metrics['kcd/C']:.3f} (schedule {kcd.condenser.predicted_cost()['schedule']:.3f}), "
              f"kept fraction {metrics['kcd/kept_fraction']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
