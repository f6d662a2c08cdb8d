"""FitNets (Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep Nets"): a regressor r maps the
student's guided layer onto the teacher's hint layer, and the hint loss (their Eq. 3)
1/2 ||u_h(x) - r(v_g(x))||^2 pulls them together.

As in the CRD benchmark (Tian et al., ICLR 2020; HobbitLong/RepDistiller, ``--distill hint``), and
mdistiller after it: one stage of training (the hint loss is added to the CE from the start), the
hint and guided layers both the middle feature ``feat[2]``, i.e. ``stage2`` (post-ReLU), the
regressor ``ConvReg`` (a conv chosen from the two spatial sizes, then BN and ReLU) and the hint loss
the mean squared error (their Eq. 3 with a mean instead of 1/2 a sum; the weight absorbs the scale).
"""
from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from torch import nn

from kcd_fast.distillers.base import Distiller, register_distiller
from kcd_fast.distillers.common import CheckedSettings, cross_entropy, feature_shape, upcast

__all__ = ["FitNetSettings", "ConvRegressor", "FitNet"]


@dataclasses.dataclass(frozen=True)
class FitNetSettings(CheckedSettings):
    """``ce_weight_fitnet`` CE + ``fitnet_weight`` hint MSE. Defaults: the CRD benchmark's CIFAR-100
    command (``-r 1 -a 0 -b 100``), mdistiller's ``FITNET.LOSS`` (CE 1, FEAT 100)."""

    ce_weight_fitnet: float = 1.0
    fitnet_weight: float = 100.0


class ConvRegressor(nn.Module):
    """CRD's ``ConvReg``: the student's [Cs, Hs, Ws] feature to the teacher's [Ct, Ht, Wt], with a
    3x3 stride-2 conv when the student's map is twice the teacher's, a 4x4 stride-2 transposed conv
    when it is half, else (student's map at least the teacher's in both sides) a valid conv of
    kernel (1 + Hs - Ht, 1 + Ws - Wt), a 1x1 conv for equal sizes; then BN and ReLU."""

    def __init__(self, student_shape, teacher_shape):
        super().__init__()
        (cs, hs, ws), (ct, ht, wt) = student_shape, teacher_shape
        if (hs, ws) == (2 * ht, 2 * wt):
            self.conv = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
        elif (2 * hs, 2 * ws) == (ht, wt):
            self.conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            self.conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
        else:
            raise ValueError(f"fitnet: the student's hint feature stage2 ({hs}x{ws}) must be at least the "
                             f"teacher's ({ht}x{wt}) in both sides, or exactly half of it, for a conv "
                             f"regressor to map it")
        self.bn = nn.BatchNorm2d(ct)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


@register_distiller("fitnet")
class FitNet(Distiller):
    """FitNets' hint loss on ``stage2`` of both networks, through a trainable :class:`ConvRegressor`."""

    student_taps = ("stage2",)
    teacher_taps = ("stage2",)
    Settings = FitNetSettings

    def __init__(self, settings, student_shapes, teacher_shapes, *, num_samples, num_classes):
        super().__init__(settings, student_shapes, teacher_shapes, num_samples=num_samples,
                         num_classes=num_classes)
        s = feature_shape("fitnet", "student", student_shapes, "stage2", 4)
        t = feature_shape("fitnet", "teacher", teacher_shapes, "stage2", 4)
        self.regressor = ConvRegressor(s, t)

    def forward(self, student, teacher, batch):
        cfg = self.settings
        hint = F.mse_loss(upcast(self.regressor(student["stage2"])), upcast(teacher["stage2"]))
        ce = cross_entropy(student["logits"], batch.target)
        terms = {"ce": cfg.ce_weight_fitnet * ce, "fitnet": cfg.fitnet_weight * hint}
        return terms["ce"] + terms["fitnet"], {k: v.detach() for k, v in terms.items()}
