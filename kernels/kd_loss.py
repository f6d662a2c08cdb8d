"""Hinton's KD loss, T^2 KL(p_T || p_S) averaged over the batch (the paper's Eq. 1), in one Triton kernel.

Installed as ``kcd_fast.kernels.kd_loss``; :func:`kcd_fast.distill.kl_distill` uses it for CUDA
tensors. In eager PyTorch the loss is about 25 small kernels a step on [B, C] rows (casts, the
division by T, a softmax, a log-softmax, the KL's terms, the batch mean and the backward of each):
at B = 256, C = 1000 every one of them is launch-bound, and together they were most of the 0.12 ms
by which a cached-knowledge step exceeded a student-only one on the H200 (benchmarks/NOTES.md).
Here one program per row reads the student's and the teacher's logits once per pass, and writes
the row's loss and its gradient with respect to the student's logits; the backward only scales
that gradient.

For row b, with s = student logits / T and t = teacher logits / T,
    log q = s - logsumexp(s),   log p = t - logsumexp(t),
    loss_b = T^2 / B * sum_c [xlogy(p_c, p_c) - p_c log q_c]    (torch.nn.functional.kl_div's terms)
    d loss / d student_c = T / B * (q_c - p_c).
A row whose logits are all -inf or hold a NaN or +inf gives NaN, and so does a class with p_c = 0
and q_c = 0 (0 * -inf), exactly where the eager loss gives NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pow2_at_least

__all__ = ["kd_loss_triton", "block_size"]


@triton.jit
def _scaled_rows(s_row, stride_sc, t_row, stride_tc, cols, C, inv_t, other):
    """The student's and the teacher's logits at ``cols`` of one row, in float32, divided by T
    (``other`` past the row's end), and the mask of the columns inside it."""
    mask = cols < C
    s = tl.load(s_row + cols * stride_sc, mask=mask, other=other).to(tl.float32) * inv_t
    t = tl.load(t_row + cols * stride_tc, mask=mask, other=other).to(tl.float32) * inv_t
    return s, t, mask


@triton.jit(do_not_specialize=["C"])
def _kd_loss_kernel(
    s_ptr, stride_sb, stride_sc,   # [B, C] student logits, fp32/fp16/bf16, any strides
    t_ptr, stride_tb, stride_tc,   # [B, C] teacher logits, fp32/fp16/bf16, any strides
    loss_ptr,                      # [B] fp32 out: T^2 / B * KL(p_T || p_S) of each row
    grad_ptr,                      # [B, C] fp32 out, contiguous: d loss / d student logits
    C,                             # classes
    inv_t,                         # 1 / T
    loss_scale,                    # T^2 / B
    grad_scale,                    # T / B
    BLOCK_C: tl.constexpr,         # classes per chunk (a power of two)
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_sb
    t_row = t_ptr + row * stride_tb
    offs = tl.arange(0, BLOCK_C)
    # Pass 1: the row maxima of s and t.
    m_s = tl.full((), float("-inf"), tl.float32)
    m_t = tl.full((), float("-inf"), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        s, t, mask = _scaled_rows(s_row, stride_sc, t_row, stride_tc, c0 + offs, C, inv_t, float("-inf"))
        m_s = tl.maximum(m_s, tl.max(s, axis=0))
        m_t = tl.maximum(m_t, tl.max(t, axis=0))
    # Pass 2: the sums of exp(x - max), hence both log-sum-exps.
    d_s = tl.zeros((), tl.float32)
    d_t = tl.zeros((), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        s, t, mask = _scaled_rows(s_row, stride_sc, t_row, stride_tc, c0 + offs, C, inv_t, 0.0)
        d_s += tl.sum(tl.where(mask, tl.exp(s - m_s), 0.0), axis=0)
        d_t += tl.sum(tl.where(mask, tl.exp(t - m_t), 0.0), axis=0)
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)
    # Pass 3: the KL's terms and the gradient.
    acc = tl.zeros((), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        s, t, mask = _scaled_rows(s_row, stride_sc, t_row, stride_tc, cols, C, inv_t, 0.0)
        log_q = s - lse_s
        log_p = t - lse_t
        p = tl.exp(log_p)
        term = tl.where(p == 0.0, 0.0, p * log_p) - p * log_q  # xlogy(p, p) - p log q, as F.kl_div
        acc += tl.sum(tl.where(mask, term, 0.0), axis=0)
        tl.store(grad_ptr + row * C + cols, (tl.exp(log_q) - p) * grad_scale, mask=mask)
    tl.store(loss_ptr + row, acc * loss_scale)


def block_size(num_classes: int) -> int:
    """Classes per chunk: the whole row up to 4096, else chunks of 4096."""
    return min(pow2_at_least(max(num_classes, 16)), 4096)


def kd_loss_triton(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, *,
                   block_c: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on valid [B, C] inputs (same shape, floating point, one device); returns the
    float32 per-row losses [B] (already times T^2 / B, so their sum is the loss) and the float32
    gradient [B, C] of that sum with respect to ``student_logits``. ``block_c`` (a power of two)
    overrides :func:`block_size`, for the tests of the chunked loop."""
    batch, num_classes = student_logits.shape
    dev = student_logits.device
    losses = torch.empty(batch, dtype=torch.float32, device=dev)
    grad = torch.empty(batch, num_classes, dtype=torch.float32, device=dev)
    if batch == 0 or num_classes == 0:
        losses.zero_()
        grad.zero_()
        return losses, grad
    t = float(temperature)
    _kd_loss_kernel[(batch,)](
        student_logits, student_logits.stride(0), student_logits.stride(1),
        teacher_logits, teacher_logits.stride(0), teacher_logits.stride(1),
        losses, grad, num_classes, 1.0 / t, t * t / batch, t / batch,
        BLOCK_C=block_c or block_size(num_classes), num_warps=4,
    )
    return losses, grad
