"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention"):
the spatial attention map of a feature A [C, H, W] is F^p_sum(A) = sum_c |A_c|^p (Sec. 3.1, p = 2),
and the loss (their Eq. 2) adds beta/2 times the sum over the layer pairs j of the distance between
the l2-normalised maps, || Q_S^j / ||Q_S^j||_2 - Q_T^j / ||Q_T^j||_2 ||_p, to the CE.

As in the CRD benchmark (HobbitLong/RepDistiller ``Attention``; mdistiller ``AT``), the map is the
channel mean of |A|^p (the same after normalisation), normalised with ``F.normalize`` (eps 1e-12),
and the distance the *mean* over the batch and the positions of the squared difference; the pairs
are all stages the two networks share (their ``feat[1:-1]``), and where their spatial sizes differ
the larger map's feature is average-pooled (adaptive) to the smaller size first.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kcd_fast.distillers.base import Distiller, register_distiller
from kcd_fast.distillers.common import CheckedSettings, cross_entropy, feature_shape, upcast
from kcd_fast.distillers.taps import stage_names

__all__ = ["ATSettings", "attention_map", "at_loss", "AT"]


@dataclasses.dataclass(frozen=True)
class ATSettings(CheckedSettings):
    """``ce_weight_at`` CE + ``at_weight`` sum over stages of the attention loss, maps of
    |A|^``at_p``. Defaults: the CRD benchmark's CIFAR-100 command (``-r 1 -a 0 -b 1000``, p = 2), as
    mdistiller's ``AT`` (CE 1, FEAT 1000, P 2), which keeps them for ImageNet."""

    ce_weight_at: float = 1.0
    at_weight: float = 1000.0
    at_p: float = 2.0


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W]: the channel mean of |A|^p, l2-normalised per sample."""
    return F.normalize(upcast(feature).abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float) -> torch.Tensor:
    """The attention loss of one stage: the mean squared difference of the two normalised maps, after
    pooling the larger-map feature to the smaller size (sizes checked by :class:`AT`)."""
    hs, ws = student.shape[-2:]
    ht, wt = teacher.shape[-2:]
    if (hs, ws) != (ht, wt):
        size = (min(hs, ht), min(ws, wt))
        student = F.adaptive_avg_pool2d(student, size) if (hs, ws) != size else student
        teacher = F.adaptive_avg_pool2d(teacher, size) if (ht, wt) != size else teacher
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


@register_distiller("at")
class AT(Distiller):
    """Attention transfer over the stages of the two networks. ``student_taps`` and ``teacher_taps``
    list the stages of the zoo's 3-stage networks; :meth:`tap_selection` gives a pair's own (all the
    stages both have, as the CRD code pairs ``feat[1:-1]``)."""

    student_taps = ("stage1", "stage2", "stage3")
    teacher_taps = ("stage1", "stage2", "stage3")
    Settings = ATSettings

    @classmethod
    def tap_selection(cls, student_available, teacher_available):
        """The stages both networks have: (student taps, teacher taps)."""
        common = tuple(n for n in stage_names(student_available) if n in set(stage_names(teacher_available)))
        return common, common

    def __init__(self, settings, student_shapes, teacher_shapes, *, num_samples, num_classes):
        super().__init__(settings, student_shapes, teacher_shapes, num_samples=num_samples,
                         num_classes=num_classes)
        self.stages = tuple(n for n in stage_names(student_shapes) if n in teacher_shapes)
        if not self.stages:
            raise ValueError(f"at: `student_shapes` and `teacher_shapes` must share stage taps (stage1, ...), "
                             f"got {sorted(student_shapes)} and {sorted(teacher_shapes)}")
        for name in self.stages:
            s = feature_shape("at", "student", student_shapes, name, 4)[1:]
            t = feature_shape("at", "teacher", teacher_shapes, name, 4)[1:]
            if not (s[0] >= t[0] and s[1] >= t[1] or s[0] <= t[0] and s[1] <= t[1]):
                raise ValueError(f"at: the attention maps of {name} ({s[0]}x{s[1]} for the student, "
                                 f"{t[0]}x{t[1]} for the teacher) must have one at least the other's size in "
                                 f"both sides, so that pooling the larger gives the smaller")

    def forward(self, student, teacher, batch):
        cfg = self.settings
        attention = sum(at_loss(student[n], teacher[n], cfg.at_p) for n in self.stages)
        ce = cross_entropy(student["logits"], batch.target)
        terms = {"ce": cfg.ce_weight_at * ce, "at": cfg.at_weight * attention}
        return terms["ce"] + terms["at"], {k: v.detach() for k, v in terms.items()}
