"""Read top-k soft labels back as dense probabilities, one fused Triton gather.

Installed as ``kcd_fast.kernels.topk_readback``; used by
:meth:`kcd_fast.KnowledgeBuffer.read` for top-k storage on CUDA. One program writes one
output row ``b``: it gathers the k stored (probability, class) pairs of sample
``indices[b]``, and writes ``C`` probabilities: the stored ones at their classes and the
remaining mass ``1 - sum`` spread uniformly over the other ``C - k`` classes; a sample not
yet ``filled`` gets a row of zeros (as dense storage does). There is no scatter: each output
column compares its class with the k stored ones, so the row is written once, in order.
The uniform share is an IEEE division (``div_rn``, as torch's on the CPU), not the compiler's
multiply by a reciprocal, so the CPU twin's rows are matched bit for bit. An index outside
[0, N) reads nothing and gets a row of NaN (the buffer's callers pass the sampler's indices).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pow2_at_least

__all__ = ["topk_readback_triton"]


@triton.jit
def _topk_readback_kernel(
    values_ptr,    # [N, k] fp32/fp16/bf16 contiguous: stored probabilities, largest first
    classes_ptr,   # [N, k] int32 contiguous: their classes
    indices_ptr,   # [B] int32/int64 contiguous: the samples to read
    filled_ptr,    # [N] uint8 (the bool mask's bytes): 0 for a sample not yet written
    out_ptr,       # [B, C] fp32 contiguous: the dense rows
    K,
    C,
    N,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    idx = tl.load(indices_ptr + row).to(tl.int64)
    in_range = (idx >= 0) & (idx < N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = (offs_k < K) & in_range
    v = tl.load(values_ptr + idx * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    cls = tl.load(classes_ptr + idx * K + offs_k, mask=mask_k, other=-1)
    rest = tl.maximum(1.0 - tl.sum(v, axis=0), 0.0)
    uniform = tl.where(C > K, tl.math.div_rn(rest, tl.maximum(C - K, 1).to(tl.float32)), 0.0)
    filled = tl.load(filled_ptr + idx, mask=in_range, other=0) != 0
    offs_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs_c
        hit = cls[:, None] == cols[None, :]
        stored = tl.sum(tl.where(hit, v[:, None], 0.0), axis=0)
        any_hit = tl.sum(hit.to(tl.int32), axis=0) > 0
        dense = tl.where(any_hit, stored, uniform)
        out = tl.where(filled, dense, 0.0)
        tl.store(out_ptr + row * C + cols, tl.where(in_range, out, float("nan")), mask=cols < C)


def topk_readback_triton(values: torch.Tensor, classes: torch.Tensor, indices: torch.Tensor,
                         num_classes: int, filled: torch.Tensor) -> torch.Tensor:
    """Dense float32 [B, num_classes] rows of the samples ``indices``; zeros where ``filled`` (bool [N])
    is False. Inputs must be valid."""
    batch = indices.shape[0]
    out = torch.empty(batch, num_classes, dtype=torch.float32, device=values.device)
    if batch == 0:
        return out
    k = values.shape[1]
    block_k = pow2_at_least(max(k, 2))
    block_c = min(pow2_at_least(max(num_classes, 16)), max(16, 16384 // block_k))
    _topk_readback_kernel[(batch,)](values, classes, indices.contiguous(), filled.view(torch.uint8), out, k,
                                    num_classes, values.shape[0], BLOCK_K=block_k, BLOCK_C=block_c, num_warps=4)
    return out
