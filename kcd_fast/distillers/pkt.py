"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, "Learning Deep Representations with
Probabilistic Knowledge Transfer"): within a batch, each network's features define conditional
probabilities p_{j|i} = K(x_j, x_i) / sum_k K(x_k, x_i) through the cosine-similarity kernel
K(a, b) = (a.b / (|a| |b|) + 1) / 2, and the student minimises KL(P_T || P_S) =
sum_i sum_j p^T_{j|i} log(p^T_{j|i} / p^S_{j|i}). The features may have different widths (no
connector: only similarities are compared).

As the authors' code, which the CRD benchmark (HobbitLong/RepDistiller ``PKT``) and mdistiller
copy: the features are the penultimate ones (``pooled``), each normalised by its norm + eps, the
sums over k include k = i (the paper leaves it out), and the KL is the *mean* over the B x B terms
of p_T log((p_T + eps) / (p_S + eps)), eps = 1e-7. (Their code also sets NaNs of the normalised
features to 0; finite features never give one, so that step is left out.)
"""
from __future__ import annotations

import dataclasses

import torch

from kcd_fast.distillers.base import Distiller, register_distiller
from kcd_fast.distillers.common import CheckedSettings, cross_entropy, feature_shape, upcast

__all__ = ["PKTSettings", "cosine_probabilities", "pkt_loss", "PKT"]

EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class PKTSettings(CheckedSettings):
    """``ce_weight_pkt`` CE + ``pkt_weight`` KL. Defaults: the CRD benchmark's CIFAR-100 command
    (``-r 1 -a 0 -b 30000``), mdistiller's ``PKT.LOSS`` (CE 1, FEAT 30000)."""

    ce_weight_pkt: float = 1.0
    pkt_weight: float = 30000.0


def cosine_probabilities(features: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """[B, D] -> [B, B]: row i holds p_{j|i}, the cosine kernel (cos + 1) / 2 normalised over j."""
    x = upcast(features)
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    kernel = (x @ x.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The PKT divergence of the batch: the mean of p_T log((p_T + eps) / (p_S + eps))."""
    p_s, p_t = cosine_probabilities(student, eps), cosine_probabilities(teacher, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@register_distiller("pkt")
class PKT(Distiller):
    """PKT on the penultimate features (``pooled``) of the two networks."""

    student_taps = ("pooled",)
    teacher_taps = ("pooled",)
    Settings = PKTSettings

    def __init__(self, settings, student_shapes, teacher_shapes, *, num_samples, num_classes):
        super().__init__(settings, student_shapes, teacher_shapes, num_samples=num_samples,
                         num_classes=num_classes)
        feature_shape("pkt", "student", student_shapes, "pooled", 2)
        feature_shape("pkt", "teacher", teacher_shapes, "pooled", 2)

    def forward(self, student, teacher, batch):
        cfg = self.settings
        divergence = pkt_loss(student["pooled"], teacher["pooled"])
        ce = cross_entropy(student["logits"], batch.target)
        terms = {"ce": cfg.ce_weight_pkt * ce, "pkt": cfg.pkt_weight * divergence}
        return terms["ce"] + terms["pkt"], {k: v.detach() for k, v in terms.items()}
