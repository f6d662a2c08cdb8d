"""The logit losses of :mod:`kcd_fast.distill` as distillers without taps, so that one registry holds
every method: ``kd`` (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", Eq. 1 of
the KCD paper: ce_weight CE + kd_weight T^2 KL) and ``dkd`` (Zhao et al., CVPR 2022, "Decoupled
Knowledge Distillation", Eq. 7: CE + warm-up (alpha TCKD + beta NCKD)). Their settings are
:class:`kcd_fast.distill.KDSettings` and :class:`kcd_fast.distill.DKDSettings`; the losses are
:func:`kcd_fast.distill.kd_loss` (one fused kernel on CUDA) and :func:`kcd_fast.distill.dkd_loss`.
They read only the logits, so they also run on cached knowledge."""
from __future__ import annotations

from kcd_fast import distill
from kcd_fast.distillers.base import Distiller, register_distiller

__all__ = ["KD", "DKD"]


@register_distiller("kd")
class KD(Distiller):
    """Vanilla KD: :func:`kcd_fast.distill.kd_loss` on the student's and the teacher's logits."""

    Settings = distill.KDSettings

    def forward(self, student, teacher, batch):
        loss = distill.kd_loss(student["logits"], teacher["logits"], batch.target, self.settings, batch.epoch)
        return loss, {"kd": loss.detach()}


@register_distiller("dkd")
class DKD(Distiller):
    """Decoupled KD: :func:`kcd_fast.distill.dkd_loss` on the student's and the teacher's logits."""

    Settings = distill.DKDSettings

    def forward(self, student, teacher, batch):
        loss = distill.dkd_loss(student["logits"], teacher["logits"], batch.target, self.settings, batch.epoch)
        return loss, {"dkd": loss.detach()}
