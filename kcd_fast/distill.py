"""Logit distillation losses for the trainer (the M-step objective, Eq. 11).

A loss is one function ``loss(student_logits, teacher_logits, target, cfg, epoch) -> scalar``
registered under a name with :func:`register_loss`; ``--distill NAME`` selects it. ``cfg`` is
the trainer's argparse namespace (temperature and weights), ``epoch`` the 0-based epoch.
To add a loss, write the function in this file (or in your own module, imported before
``main``) and decorate it::

    @register_loss("my_loss")
    def my_loss(student_logits, teacher_logits, target, cfg, epoch):
        return F.cross_entropy(student_logits, target) + ...
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LOSSES: dict[str, Callable] = {}


def register_loss(name: str):
    """Register a distillation loss under ``name`` (the value of ``--distill``)."""

    def deco(fn):
        LOSSES[name] = fn
        return fn

    return deco


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s KL(p_T || p_S) at temperature T, times T^2, averaged over the batch (Eq. 1)."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature ** 2


@register_loss("kd")
def kd_loss(student_logits, teacher_logits, target, cfg, epoch):
    """Vanilla KD as in the paper's CIFAR setup (CRD/KCD scripts): ce_weight * CE + kd_weight * KL."""
    ce = F.cross_entropy(student_logits.float(), target)
    return cfg.ce_weight * ce + cfg.kd_weight * kl_distill(student_logits, teacher_logits, cfg.kd_temperature)


@register_loss("dkd")
def dkd_loss(student_logits, teacher_logits, target, cfg, epoch):
    """Decoupled KD (Zhao et al., CVPR 2022): CE + warm-up * (alpha * TCKD + beta * NCKD).

    TCKD is the KL between the binary (target, non-target) probabilities; NCKD the KL among the
    non-target classes, with the target logit masked out. Defaults follow mdistiller: alpha 1,
    beta 8, T 4, a linear warm-up over ``dkd_warmup`` epochs.
    """
    t = cfg.kd_temperature
    s, te = student_logits.float(), teacher_logits.float()
    gt = F.one_hot(target, s.shape[1]).bool()
    p_s, p_t = F.softmax(s / t, dim=1), F.softmax(te / t, dim=1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], dim=1).clamp_min(1e-12)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], dim=1)
    tckd = F.kl_div(b_s.log(), b_t, reduction="batchmean") * t ** 2
    log_q_s = F.log_softmax(s / t - 1000.0 * gt, dim=1)
    q_t = F.softmax(te / t - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="batchmean") * t ** 2
    warm = min((epoch + 1) / max(cfg.dkd_warmup, 1), 1.0)
    return cfg.ce_weight_dkd * F.cross_entropy(s, target) + warm * (cfg.dkd_alpha * tckd + cfg.dkd_beta * nckd)
