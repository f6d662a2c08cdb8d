"""A feature distiller (:mod:`kcd_fast.distillers`) in the trainer: its taps on the student and the
teacher, and the student and the distiller's trainable parts as one module to optimise.

The logit losses (``kd``, ``dkd``, a ``--loss-module`` loss) run through :class:`engine.Distiller`,
which also reads cached knowledge; every other ``--distill`` name is a feature distiller, built here
once the student and the teacher exist (one probing forward gives the tapped shapes).
"""
from __future__ import annotations

import torch
from torch import nn

from kcd_fast import distillers
from kcd_fast.distillers import Batch


class StudentWithDistiller(nn.Module):
    """The student and the distiller as one module: one optimizer trains both, and under torchrun one
    DDP wrap all-reduces the gradients of both. ``forward`` runs the student on ``x``, then the
    distiller on its logits and taps and the teacher's outputs; it returns (logits, loss, logs)."""

    def __init__(self, student: nn.Module, distiller: distillers.Distiller, taps):
        super().__init__()
        self.student = student
        self.distiller = distiller
        self.taps = taps  # FeatureTaps of the student (None: the distiller reads only its logits)

    def forward(self, x, teacher_out: dict, target, index, epoch: int):
        logits = self.student(x)
        student_out = {"logits": logits, **(self.taps.values if self.taps is not None else {})}
        loss, logs = self.distiller(student_out, teacher_out, Batch(target, index, epoch))
        return self.distiller.observed_rows(logits), loss, logs


class FeatureDistill:
    """``--distill NAME`` for a feature distiller: the distiller with its settings (read from the
    config once), the hooks on the teacher, and :meth:`step`, the training step's forward."""

    def __init__(self, cfg, student: nn.Module, teacher: nn.Module | None, sample: torch.Tensor, *,
                 num_samples: int, num_classes: int):
        self.name = cfg.distill
        settings = distillers.distiller_settings(cfg.distill, cfg)
        try:
            built = distillers.build_distiller(cfg.distill, settings, student, teacher, sample,
                                               num_samples=num_samples, num_classes=num_classes,
                                               student_label=f"--student {cfg.student}",
                                               teacher_label=f"--teacher {cfg.teacher}")
        except ValueError as exc:
            raise ValueError(f"--distill {cfg.distill}: {exc}") from None
        self.distiller, self.teacher_taps = built.distiller, built.teacher_taps
        self.module = StudentWithDistiller(student, built.distiller, built.student_taps)
        self.log_sums: dict[str, torch.Tensor] = {}

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """The inputs the teacher and :meth:`step` run on, from the batch's (SSKD: its rotated views)."""
        return self.distiller.views(x)

    def step(self, model: nn.Module, x, teacher_logits, target, index, epoch: int):
        """(student logits of the batch's own rows, loss) of one batch of :meth:`views`; ``model``:
        :attr:`module`, or its DDP wrap. The distiller's logs are summed on the device (read once an
        epoch by :meth:`epoch_logs`)."""
        teacher_out = {"logits": teacher_logits, **(self.teacher_taps.values if self.teacher_taps else {})}
        logits, loss, logs = model(x, teacher_out, target, index, epoch)
        self.add_logs(logs, target.shape[0])
        return logits, loss

    def add_logs(self, logs: dict, samples: int) -> None:
        """Add a step's logged values, weighted by its samples, to the device sums."""
        for key, value in logs.items():
            total = self.log_sums.get(key)
            weighted = value.detach().double() * samples
            self.log_sums[key] = weighted if total is None else total.add_(weighted)

    def epoch_logs(self, samples: int) -> dict[str, float]:
        """Each logged value's mean over this process's samples of the epoch (one host read), then reset."""
        if not self.log_sums:
            return {}
        keys = sorted(self.log_sums)
        means = (torch.stack([self.log_sums[k] for k in keys]) / max(samples, 1)).tolist()
        self.log_sums = {}
        return dict(zip(keys, means))


def ignore_rank_synchronised_buffers(module: StudentWithDistiller) -> None:
    """DDP broadcasts a module's buffers from rank 0 at each forward; the distiller's buffers are left
    out: a memory bank is kept identical on every rank by the distiller itself (one all_gather a
    step), and broadcasting it would move the whole bank every step."""
    names = [f"distiller.{name}" for name, _ in module.distiller.named_buffers()]
    if names:
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
