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
    """Hinton et al.'s KL(p_T || p_S) at temperature T, times T^2, averaged over the batch (Eq. 1).

    On CUDA, with a teacher that takes no gradient (the trainer's: run under no_grad, or read from
    the knowledge buffer), one fused Triton kernel computes it and its gradient
    (:func:`kl_distill_fused`); elsewhere its eager twin :func:`kl_distill_torch`. Both compute in
    float32 the same terms, those of ``F.kl_div``."""
    _check_kl_inputs(student_logits, teacher_logits, temperature)
    if student_logits.is_cuda and not (teacher_logits.requires_grad and torch.is_grad_enabled()):
        return _fused(student_logits, teacher_logits, temperature)
    return kl_distill_torch(student_logits, teacher_logits, temperature)


def kl_distill_torch(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`kl_distill` in eager PyTorch: about 25 small kernels with its backward (the fused one's twin)."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature ** 2


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def kl_distill_fused(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`kl_distill` in one Triton kernel (kcd_fast/kernels/kd_loss.py; on a CPU tensor it needs
    Triton's interpreter, TRITON_INTERPRET=1). The backward scales the gradient the kernel wrote; the
    teacher gets none (its logits are treated as constants)."""
    _check_kl_inputs(student_logits, teacher_logits, temperature)
    return _fused(student_logits, teacher_logits, temperature)


def _fused(student_logits, teacher_logits, temperature):
    return _FusedKL.apply(student_logits, teacher_logits.detach(), float(temperature))


def _check_kl_inputs(student_logits, teacher_logits, temperature) -> None:
    op = "kl_distill"
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.dtype not in _FLOATS or 0 in x.shape:
            raise ValueError(f"{op}: `{name}` must be a 2-D [B, C] floating-point tensor (float32, float16, "
                             f"bfloat16 or float64) with B, C >= 1, got {x.dim()}-D {x.dtype} of shape "
                             f"{tuple(x.shape)}")
    if teacher_logits.shape != student_logits.shape or teacher_logits.device != student_logits.device:
        raise ValueError(f"{op}: `teacher_logits` must match `student_logits` in shape and device, got "
                         f"{tuple(teacher_logits.shape)} on {teacher_logits.device} and "
                         f"{tuple(student_logits.shape)} on {student_logits.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"{op}: `temperature` must be a positive finite number, got {temperature!r}")


class _FusedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature):
        from kcd_fast.kernels.kd_loss import kd_loss_triton

        losses, grad = kd_loss_triton(student_logits, teacher_logits, temperature)
        ctx.save_for_backward(grad)
        ctx.student_dtype = student_logits.dtype
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.student_dtype), None, None


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
