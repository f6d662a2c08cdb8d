"""Logit distillation losses for the trainer (the M-step objective, Eq. 11).

A loss is one function ``loss(student_logits, teacher_logits, target, cfg, epoch) -> scalar``
registered under a name with :func:`register_loss`; ``--distill NAME`` selects it. ``epoch`` is
the 0-based epoch, and ``cfg`` the loss's settings: any object with the attributes it reads.
A built-in loss declares them as a frozen dataclass (:class:`KDSettings`, :class:`DKDSettings`,
whose field names are the trainer's option names); the trainer builds that object once, at the
start, with :func:`loss_settings`. A loss registered without settings gets the trainer's own
read-only configuration. To add a loss, write the function in this file (or in your own module,
imported before ``main``, e.g. with ``--loss-module``) and decorate it::

    @register_loss("my_loss")
    def my_loss(student_logits, teacher_logits, target, cfg, epoch):
        return F.cross_entropy(student_logits, target) + ...

With ``--knowledge cached`` the trainer passes such a loss the logits that reproduce the buffer's
soft labels (:meth:`kcd_fast.KnowledgeBuffer.teacher_logits`). A loss may also register a variant that
reads the buffer itself, ``loss(student_logits, knowledge, index, target, cfg, epoch)``, with
:func:`register_knowledge_loss` under the same name; ``kd`` does, so that on CUDA its one fused kernel
reads the buffer's rows in place.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from kcd_fast.checks import LOGIT_DTYPES, check_index_range, check_int, check_real, check_temperature

LOSSES: dict[str, Callable] = {}
KNOWLEDGE_LOSSES: dict[str, Callable] = {}
LOSS_SETTINGS: dict[str, type | None] = {}  # name -> the settings dataclass of the loss (None: the config itself)


class _CheckedSettings:
    """Loss settings checked when made: a finite temperature > 0 (1/T a finite float32), weights finite
    and >= 0, a warm-up an int >= 0."""

    def __post_init__(self):
        op = type(self).__name__
        for field in dataclasses.fields(self):
            x = getattr(self, field.name)
            if field.name == "kd_temperature":
                check_temperature(op, x, field.name)
            elif field.name == "dkd_warmup":
                check_int(op, field.name, x, 0)
            else:
                check_real(op, field.name, x, lo=0.0)


@dataclasses.dataclass(frozen=True)
class KDSettings(_CheckedSettings):
    """What :func:`kd_loss` reads: ``kd_weight`` * T^2 KL at T = ``kd_temperature`` plus ``ce_weight`` * CE."""

    kd_temperature: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9


@dataclasses.dataclass(frozen=True)
class DKDSettings(_CheckedSettings):
    """What :func:`dkd_loss` reads: ``ce_weight_dkd`` * CE + warm-up * (``dkd_alpha`` TCKD + ``dkd_beta`` NCKD)
    at T = ``kd_temperature``, the warm-up linear over ``dkd_warmup`` epochs."""

    kd_temperature: float = 4.0
    ce_weight_dkd: float = 1.0
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_warmup: int = 20


def register_loss(name: str, settings: type | None = None):
    """Register a distillation loss under ``name`` (the value of ``--distill``). ``settings``: the
    frozen dataclass of what the loss reads from ``cfg`` (see :func:`loss_settings`), or None for a
    loss that takes the trainer's configuration as it is."""
    if settings is not None and not (isinstance(settings, type) and dataclasses.is_dataclass(settings)):
        raise TypeError(f"register_loss: `settings` must be a dataclass type or None, got {settings!r}")

    def deco(fn):
        LOSSES[name] = fn
        LOSS_SETTINGS[name] = settings
        return fn

    return deco


def loss_settings(name: str, config):
    """The ``cfg`` to pass the loss ``name``: its settings dataclass built from the attributes of
    ``config`` of the same names (e.g. the trainer's configuration), or ``config`` itself for a loss
    registered without settings."""
    if name not in LOSSES:
        raise ValueError(f"loss_settings: no loss is registered as {name!r}; registered: {', '.join(sorted(LOSSES))}")
    kind = LOSS_SETTINGS.get(name)
    if kind is None:
        return config
    return settings_from_config(kind, config, "loss_settings", f"the loss {name!r}")


def settings_from_config(kind: type, config, op: str, reader: str):
    """The settings dataclass ``kind`` built from the attributes of ``config`` of its field names;
    ValueError from ``op`` naming those ``config`` lacks (``reader``: what reads them)."""
    names = [field.name for field in dataclasses.fields(kind)]
    missing = [key for key in names if not hasattr(config, key)]
    if missing:
        raise ValueError(f"{op}: {reader} reads {', '.join(missing)}, which `config` "
                         f"({type(config).__name__}) does not have")
    return kind(**{key: getattr(config, key) for key in names})


def register_knowledge_loss(name: str):
    """Register the variant of loss ``name`` that reads a :class:`kcd_fast.KnowledgeBuffer` itself:
    ``fn(student_logits, knowledge, index, target, cfg, epoch)``, for the steps whose knowledge comes
    from the buffer. It must give what ``LOSSES[name]`` gives on ``knowledge.teacher_logits(index)``."""

    def deco(fn):
        KNOWLEDGE_LOSSES[name] = fn
        return fn

    return deco


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s KL(p_T || p_S) at temperature T, times T^2, averaged over the batch (Eq. 1).

    On CUDA, with a teacher that takes no gradient (the trainer's: run under no_grad, or read from
    the knowledge buffer), one fused Triton kernel computes it and its gradient
    (:func:`kl_distill_fused`); elsewhere its eager twin :func:`kl_distill_torch`. Both compute in
    float32 the same terms, those of ``F.kl_div``."""
    _check_kl_inputs("kl_distill", student_logits, teacher_logits, temperature)
    if _fusable(student_logits, teacher_logits):
        return _fused(student_logits, teacher_logits, temperature)
    return kl_distill_torch(student_logits, teacher_logits, temperature)


def kl_distill_torch(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`kl_distill` in eager PyTorch: about 25 small kernels with its backward (the fused one's twin)."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature ** 2


_FLOATS = (*LOGIT_DTYPES, torch.float64)


def kl_distill_fused(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`kl_distill` in one Triton kernel (kcd_fast/kernels/kd_loss.py; on a CPU tensor it needs
    Triton's interpreter, TRITON_INTERPRET=1). The backward scales the gradient the kernel wrote; the
    teacher gets none (its logits are treated as constants)."""
    _check_kl_inputs("kl_distill", student_logits, teacher_logits, temperature)
    return _fused(student_logits, teacher_logits, temperature)


def _fusable(student_logits, teacher_logits) -> bool:
    """The fused kernel runs for CUDA logits and a teacher that takes no gradient (it gives the teacher none)."""
    return student_logits.is_cuda and not (teacher_logits.requires_grad and torch.is_grad_enabled())


def _fused(student_logits, teacher_logits, temperature, target=None, ce_weight=0.0, kd_weight=1.0):
    return _FusedKD.apply(student_logits, teacher_logits.detach(), float(temperature), target, float(ce_weight),
                          float(kd_weight), None, False, 1.0)


def _check_logits(op, name, x) -> None:
    """``x`` is a 2-D [B, C] floating-point tensor with B, C >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.dtype not in _FLOATS or 0 in x.shape:
        raise ValueError(f"{op}: `{name}` must be a 2-D [B, C] floating-point tensor (float32, float16, "
                         f"bfloat16 or float64) with B, C >= 1, got {x.dim()}-D {x.dtype} of shape "
                         f"{tuple(x.shape)}")


def _check_kl_inputs(op, student_logits, teacher_logits, temperature) -> None:
    _check_logits(op, "student_logits", student_logits)
    _check_logits(op, "teacher_logits", teacher_logits)
    if teacher_logits.shape != student_logits.shape or teacher_logits.device != student_logits.device:
        raise ValueError(f"{op}: `teacher_logits` must match `student_logits` in shape and device, got "
                         f"{tuple(teacher_logits.shape)} on {teacher_logits.device} and "
                         f"{tuple(student_logits.shape)} on {student_logits.device}")
    check_temperature(op, temperature)


def _check_target(op, target, student_logits) -> None:
    """Labels for the CE term: int64 [B] on the logits' device, in [0, C) (checked on the CPU and in
    debug mode, :func:`kcd_fast.ops.set_debug`: a host sync on CUDA)."""
    b, c = student_logits.shape
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{op}: `target` must be a torch.Tensor of labels, got {type(target).__name__}")
    if target.dtype != torch.int64 or target.shape != (b,) or target.device != student_logits.device:
        raise ValueError(f"{op}: `target` must be an int64 tensor of {b} labels on {student_logits.device}, got "
                         f"{target.dtype} of shape {tuple(target.shape)} on {target.device}")
    check_index_range(op, "target", target, c)


class _FusedKD(torch.autograd.Function):
    """ce_w CE + kd_w T^2 KL in one kernel (kernels/kd_loss.py); the teacher (logits, or probabilities
    with ``probs``, rows ``index`` of it when given) and the labels get no gradient."""

    @staticmethod
    def forward(ctx, student_logits, teacher, temperature, target, ce_weight, kd_weight, index, probs, teacher_scale):
        from kcd_fast.kernels.kd_loss import kd_loss_triton

        # The gradient is written in the student's dtype where that loses nothing to the scale applied
        # after it (bf16 has float32's exponent range: one kernel fewer); fp16 gradients of T / B (q - p)
        # would be subnormal before a GradScaler's scale, so they are scaled in float32 first.
        grad_dtype = student_logits.dtype if student_logits.dtype == torch.bfloat16 else torch.float32
        losses, grad = kd_loss_triton(student_logits, teacher, temperature, teacher_is_probs=probs,
                                      teacher_index=index, target=target, ce_weight=ce_weight,
                                      kd_weight=kd_weight, teacher_scale=teacher_scale, grad_dtype=grad_dtype)
        ctx.save_for_backward(grad)
        ctx.student_dtype = student_logits.dtype
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.student_dtype), None, None, None, None, None, None, None, None


@register_loss("kd", KDSettings)
def kd_loss(student_logits, teacher_logits, target, cfg, epoch):
    """Vanilla KD as in the paper's CIFAR setup (CRD/KCD scripts): ce_weight * CE + kd_weight * KL (Eq. 1).

    On CUDA, with a teacher that takes no gradient, one fused Triton kernel computes the whole loss and
    its gradient; elsewhere its eager twin :func:`kd_loss_torch`."""
    if isinstance(student_logits, torch.Tensor) and isinstance(teacher_logits, torch.Tensor) and _fusable(
            student_logits, teacher_logits):
        _check_kl_inputs("kd_loss", student_logits, teacher_logits, cfg.kd_temperature)
        _check_target("kd_loss", target, student_logits)
        return _fused(student_logits, teacher_logits, cfg.kd_temperature, target, cfg.ce_weight, cfg.kd_weight)
    return kd_loss_torch(student_logits, teacher_logits, target, cfg, epoch)


def kd_loss_torch(student_logits, teacher_logits, target, cfg, epoch):
    """:func:`kd_loss` in eager PyTorch (the fused kernel's twin, and the CPU path)."""
    _check_kl_inputs("kd_loss", student_logits, teacher_logits, cfg.kd_temperature)
    ce = F.cross_entropy(student_logits.float(), target)
    return cfg.ce_weight * ce + cfg.kd_weight * kl_distill_torch(student_logits, teacher_logits, cfg.kd_temperature)


@register_knowledge_loss("kd")
def kd_loss_from_knowledge(student_logits, knowledge, index, target, cfg, epoch):
    """:func:`kd_loss` with the teacher's soft labels read from ``knowledge`` (a
    :class:`kcd_fast.KnowledgeBuffer`) at the samples ``index``.

    On CUDA one fused kernel reads the dense buffer's rows in place (no gathered copy, no logits
    written out), or the rows that top-k storage reads back as dense probabilities; elsewhere, and for
    a buffer on another device than the logits, its twin ``kd_loss(student_logits,
    knowledge.teacher_logits(index), ...)``. Both see the distribution softmax(T_k log max(p, 1e-20) / T)
    of the stored p at the buffer's temperature T_k (p itself when T_k = T, as in the trainer)."""
    if not (isinstance(student_logits, torch.Tensor) and student_logits.is_cuda
            and student_logits.device == knowledge.device):
        return kd_loss(student_logits, knowledge.teacher_logits(index), target, cfg, epoch)
    return kd_loss_from_knowledge_fused(student_logits, knowledge, index, target, cfg, epoch)


def kd_loss_from_knowledge_fused(student_logits, knowledge, index, target, cfg, epoch):
    """:func:`kd_loss_from_knowledge` in one Triton kernel, for logits on the buffer's device (on the CPU
    it needs Triton's interpreter, TRITON_INTERPRET=1). Top-k storage first reads its rows back as
    dense probabilities (one more kernel)."""
    op = "kd_loss_from_knowledge"
    _check_logits(op, "student_logits", student_logits)
    if student_logits.device != knowledge.device:
        raise ValueError(f"{op}: `student_logits` must be on the buffer's device {knowledge.device}, got "
                         f"{student_logits.device}")
    idx = knowledge.checked_indices(op, index)
    if student_logits.shape != (idx.shape[0], knowledge.num_classes):
        raise ValueError(f"{op}: `student_logits` must be [B, {knowledge.num_classes}] with B = len(index) "
                         f"({idx.shape[0]}), got {tuple(student_logits.shape)}")
    check_temperature(op, cfg.kd_temperature)
    _check_target(op, target, student_logits)
    if knowledge.storage == "dense":
        teacher, rows = knowledge.probs, idx
    else:
        teacher, rows = knowledge.read(idx), None
    return _FusedKD.apply(student_logits, teacher, float(cfg.kd_temperature), target, float(cfg.ce_weight),
                          float(cfg.kd_weight), rows, True, knowledge.temperature / float(cfg.kd_temperature))


@register_loss("dkd", DKDSettings)
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
