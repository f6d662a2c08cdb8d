"""Vanilla KD's loss, ce_w CE + kd_w T^2 KL(p_T || p_S) averaged over the batch (the paper's Eq. 1, the
M-step objective of Eq. 11), and its gradient, in one Triton kernel.

Installed as ``kcd_fast.kernels.kd_loss``; :mod:`kcd_fast.distill` uses it for CUDA tensors. In eager
PyTorch this loss is about 35 small kernels a step on [B, C] rows (casts, the division by T, a
softmax, two log-softmaxes, the KL's terms, the NLL, the weights, the batch means and the backward of
each): at B = 256, C = 1000 every one of them is launch-bound. Here one program per row reads the
student's and the teacher's row once per pass and writes the row's loss and its gradient with
respect to the student's logits; the backward only scales that gradient.

The teacher's side comes in one of two forms:

* logits z_T (``TEACHER_PROBS`` False): p = softmax(z_T / T);
* stored probabilities p~ (``TEACHER_PROBS`` True), e.g. a cached knowledge buffer's rows at
  temperature T: p = p~' / sum(p~') with p~' = max(p~, 1e-20), exactly the distribution that the
  logits T log p~' (:meth:`kcd_fast.KnowledgeBuffer.teacher_logits`) give at temperature T. With
  ``GATHER``, row b of the teacher is row ``idx[b]`` of the [N, C] buffer, read in place (no gathered
  copy, no cast, no log written out).

For row b, with s the student's logits, t = z_T / T (or log p~'),
    log q = s / T - logsumexp(s / T),   log p = t - logsumexp(t),   log r = s - logsumexp(s),
    loss_b = kd_w T^2 / B * sum_c [xlogy(p_c, p_c) - p_c log q_c] + ce_w / B * (-log r_y)
    d loss / d s_c = kd_w T / B * (q_c - p_c) + ce_w / B * (r_c - [c = y])
(``torch.nn.functional.kl_div``'s and ``cross_entropy``'s terms). A row whose logits are all -inf or
hold a NaN or +inf gives NaN, and so does a class with p_c = 0 and q_c = 0 (0 * -inf), exactly where
the eager loss gives NaN. A label outside [0, C) or a ``GATHER`` index outside [0, N) reads nothing
and gives the row NaN (the callers check both on the CPU and in debug mode).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pow2_at_least

__all__ = ["kd_loss_triton", "block_size"]


@triton.jit
def _rows(s_row, stride_sc, t_row, stride_tc, cols, C, t_scale, TEACHER_PROBS: tl.constexpr):
    """At ``cols`` of one row, in float32: the student's logits s, the teacher's t (z_T / T, or
    T_k / T times the log of its floored probability), and the mask of the columns inside the row
    (0 past its end)."""
    mask = cols < C
    s = tl.load(s_row + cols * stride_sc, mask=mask, other=0.0).to(tl.float32)
    if TEACHER_PROBS:
        p = tl.load(t_row + cols * stride_tc, mask=mask, other=1.0).to(tl.float32)
        t = tl.log(tl.where(p < 1e-20, 1e-20, p)) * t_scale  # NaN stays NaN, as clamp_min keeps it
    else:
        t = tl.load(t_row + cols * stride_tc, mask=mask, other=0.0).to(tl.float32) * t_scale
    return s, t, mask


@triton.jit(do_not_specialize=["C", "N"])
def _kd_loss_kernel(
    s_ptr, stride_sb, stride_sc,   # [B, C] student logits, fp32/fp16/bf16, any strides
    t_ptr, stride_tb, stride_tc,   # teacher: [B, C] logits, or probabilities ([N, C] with GATHER), any strides
    idx_ptr,                       # [B] int32/int64: the teacher's row of each student row (GATHER only)
    y_ptr,                         # [B] int64 labels (HAS_CE only)
    loss_ptr,                      # [B] fp32 out: each row's share of the loss (their sum is the loss)
    grad_ptr,                      # [B, C] out, contiguous, the student's dtype: d loss / d student logits
    C,                             # classes
    N,                             # rows of the teacher tensor (the GATHER indices' range)
    inv_t,                         # 1 / T
    t_scale,                       # what the teacher's values are multiplied by: 1 / T (logits), T_k / T (probabilities)
    kd_loss_scale,                 # kd_w T^2 / B
    kd_grad_scale,                 # kd_w T / B
    ce_scale,                      # ce_w / B
    BLOCK_C: tl.constexpr,         # classes per chunk (a power of two)
    TEACHER_PROBS: tl.constexpr,   # the teacher's rows are probabilities at T, not logits
    GATHER: tl.constexpr,          # the teacher's row b is row idx[b]
    HAS_CE: tl.constexpr,          # add ce_w times the cross-entropy with the labels y
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_sb
    valid = row >= 0  # a true scalar
    if GATHER:
        src = tl.load(idx_ptr + row).to(tl.int64)
        valid = (src >= 0) & (src < N)
        t_row = t_ptr + tl.where(valid, src, 0) * stride_tb
    else:
        t_row = t_ptr + row * stride_tb
    offs = tl.arange(0, BLOCK_C)
    # Pass 1: the row maxima (of s; max(s / T) = max(s) / T for T > 0).
    m_s = tl.full((), float("-inf"), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        s, t, mask = _rows(s_row, stride_sc, t_row, stride_tc, c0 + offs, C, t_scale, TEACHER_PROBS)
        m_s = tl.maximum(m_s, tl.max(tl.where(mask, s, float("-inf")), axis=0))
        m_t = tl.maximum(m_t, tl.max(tl.where(mask, t, float("-inf")), axis=0))
    # Pass 2: the sums of exp(x - max), hence the log-sum-exps (of s / T, of t, and of s for the CE).
    d_q = tl.zeros((), tl.float32)
    d_p = tl.zeros((), tl.float32)
    d_r = tl.zeros((), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        s, t, mask = _rows(s_row, stride_sc, t_row, stride_tc, c0 + offs, C, t_scale, TEACHER_PROBS)
        d_q += tl.sum(tl.where(mask, tl.exp((s - m_s) * inv_t), 0.0), axis=0)
        d_p += tl.sum(tl.where(mask, tl.exp(t - m_t), 0.0), axis=0)
        if HAS_CE:
            d_r += tl.sum(tl.where(mask, tl.exp(s - m_s), 0.0), axis=0)
    lse_q = m_s * inv_t + tl.log(d_q)
    lse_p = m_t + tl.log(d_p)
    lse_r = m_s + tl.log(d_r)
    y = tl.zeros((), tl.int64) - 1
    if HAS_CE:
        y = tl.load(y_ptr + row).to(tl.int64)
        valid = valid & (y >= 0) & (y < C)
    # Pass 3: the KL's terms and the gradient.
    acc = tl.zeros((), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        s, t, mask = _rows(s_row, stride_sc, t_row, stride_tc, cols, C, t_scale, TEACHER_PROBS)
        log_q = s * inv_t - lse_q
        log_p = t - lse_p
        p = tl.exp(log_p)
        term = tl.where(p == 0.0, 0.0, p * log_p) - p * log_q  # xlogy(p, p) - p log q, as F.kl_div
        acc += tl.sum(tl.where(mask, term, 0.0), axis=0)
        grad = (tl.exp(log_q) - p) * kd_grad_scale
        if HAS_CE:
            grad += (tl.exp(s - lse_r) - tl.where(cols == y, 1.0, 0.0)) * ce_scale
        grad = tl.where(valid, grad, float("nan"))
        tl.store(grad_ptr + row * C + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    loss = acc * kd_loss_scale
    if HAS_CE:
        s_y = tl.load(s_row + tl.where(valid, y, 0) * stride_sc).to(tl.float32)
        loss += (lse_r - s_y) * ce_scale
    tl.store(loss_ptr + row, tl.where(valid, loss, float("nan")))


def block_size(num_classes: int) -> int:
    """Classes per chunk: the whole row up to 4096, else chunks of 4096."""
    return min(pow2_at_least(max(num_classes, 16)), 4096)


def kd_loss_triton(student_logits: torch.Tensor, teacher: torch.Tensor, temperature: float, *,
                   teacher_is_probs: bool = False, teacher_index: torch.Tensor | None = None,
                   target: torch.Tensor | None = None, ce_weight: float = 0.0, kd_weight: float = 1.0,
                   teacher_scale: float = 1.0, grad_dtype: torch.dtype = torch.float32,
                   block_c: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on valid inputs; returns the float32 per-row losses [B] (their sum is the loss)
    and the gradient [B, C] of that sum with respect to ``student_logits``, in ``grad_dtype``.

    ``student_logits`` [B, C]; ``teacher`` [B, C] logits, or probabilities at ``temperature`` with
    ``teacher_is_probs`` ([N, C] rows picked by ``teacher_index`` [B] when it is given), stored at
    temperature ``teacher_scale`` * T; ``target`` [B] int64 labels for the ``ce_weight`` cross-entropy term (None: no
    CE). Everything on one device. ``block_c`` (a power of two) overrides :func:`block_size`, for the
    tests of the chunked loop."""
    batch, num_classes = student_logits.shape
    dev = student_logits.device
    losses = torch.empty(batch, dtype=torch.float32, device=dev)
    grad = torch.empty(batch, num_classes, dtype=grad_dtype, device=dev)
    if batch == 0:
        return losses, grad
    gather = teacher_index is not None
    if teacher_index is not None and not teacher_index.is_contiguous():
        teacher_index = teacher_index.contiguous()
    has_ce = target is not None
    if has_ce and (target.dtype != torch.int64 or not target.is_contiguous()):
        target = target.long().contiguous()
    t = float(temperature)
    _kd_loss_kernel[(batch,)](
        student_logits, student_logits.stride(0), student_logits.stride(1),
        teacher, teacher.stride(0), teacher.stride(1),
        teacher_index if gather else losses,  # an unused pointer argument still needs a tensor
        target if has_ce else losses,
        losses, grad, num_classes, teacher.shape[0], 1.0 / t, float(teacher_scale) if teacher_is_probs else 1.0 / t,
        kd_weight * t * t / batch, kd_weight * t / batch, ce_weight / batch,
        BLOCK_C=block_c or block_size(num_classes), TEACHER_PROBS=bool(teacher_is_probs), GATHER=gather,
        HAS_CE=has_ce, num_warps=4,
    )
    return losses, grad
