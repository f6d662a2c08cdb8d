"""CRD's contrastive scores against a memory bank, s[b, k] = <memory[idx[b, k]], v[b]>, and their
gradient with respect to v, in Triton, without the gathered [B, K+1, d] tensor.

Installed as ``kcd_fast.kernels.crd_scores``; :mod:`kcd_fast.distillers.crd` uses it. In CRD
(Tian et al., ICLR 2020, Sec. 3.1) the critic h(T, S) (see the distiller) needs,
for each sample b of a batch, the dot products of its embedding v[b] (d = 128) with the bank's
rows of its own dataset index (column 0, the positive) and of K noise indices (K = 16,384). The
eager form, ``torch.bmm(memory[idx], v.unsqueeze(2))``, writes and reads back the gathered rows:
at B = 256, K = 16,384, d = 128 that is B (K+1) d = 537 M elements (1.07 GB in fp16, 2.1 GB in fp32)
written, read again by the bmm, and kept for the backward. Here:

* the forward (:func:`crd_scores_triton`): one program per (b, block of BLOCK_K indices) reads the
  block's BLOCK_K bank rows once (BLOCK_D columns at a time, in a loop over d) and writes BLOCK_K
  float32 scores; v[b] stays in cache for the row's programs, which run next to each other;
* the backward (:func:`crd_scores_grad_triton`), grad_v[b] = sum_k g[b, k] memory[idx[b, k]]: one
  program per (b, slice of the K+1 indices, block of d) loops over its slice, BLOCK_K rows a step,
  into a float32 [BLOCK_K, BLOCK_D] accumulator, and writes its partial sum; the SPLIT slices of a
  row are then added in a fixed order (no atomics: the result does not depend on scheduling).

Each pass reads the B (K+1) gathered rows once and nothing else of size: it is bound by the memory
bandwidth of those random 2d- or 4d-byte rows. The arithmetic is float32 whatever the dtypes of v,
memory and g (fp32, fp16 or bf16, each its own). No gradient flows to the bank, a buffer that CRD
moves by momentum (:class:`CRDScores` refuses a bank that requires grad). An index outside [0, N)
reads nothing and gives its score NaN, and the gradient of its row NaN (the validated entry
:func:`crd_scores` checks the indices on the CPU, and on CUDA in debug mode).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kcd_fast.checks import (INDEX_DTYPES, LOGIT_DTYPES, check_index_range, check_same_device, check_tensor)

from . import pow2_at_least

__all__ = ["crd_scores", "crd_scores_torch", "crd_scores_grad_torch", "crd_scores_triton",
           "crd_scores_grad_triton", "CRDScores", "check_scores_inputs", "forward_config", "backward_config"]


@triton.jit
def _bank_rows(m_ptr, stride_mn, idx_ptr, stride_ik, row_idx, ks, K1, N):
    """The bank rows of the indices ``ks`` of one row of idx: their int64 offsets (0 where not valid)
    and whether each is valid (k < K+1 and 0 <= idx < N)."""
    kmask = ks < K1
    rows = tl.load(idx_ptr + row_idx + ks.to(tl.int64) * stride_ik, mask=kmask, other=0).to(tl.int64)
    valid = kmask & (rows >= 0) & (rows < N)
    return m_ptr + tl.where(valid, rows, 0) * stride_mn, kmask, valid


@triton.jit(do_not_specialize=["K1", "N"])
def _scores_kernel(
    v_ptr, stride_vb, stride_vd,        # [B, d] embeddings, fp32/fp16/bf16, any strides
    m_ptr, stride_mn, stride_md,        # [N, d] memory bank, fp32/fp16/bf16, any strides
    idx_ptr, stride_ib, stride_ik,      # [B, K+1] int32/int64 bank rows, any strides
    out_ptr,                            # [B, K+1] fp32 out, contiguous
    K1, D, N, NUM_KB,                   # K+1, d, bank rows, blocks of BLOCK_K per row of idx
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NUM_KB
    ks = (pid % NUM_KB) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ptr, kmask, valid = _bank_rows(m_ptr, stride_mn, idx_ptr, stride_ik, b * stride_ib, ks, K1, N)
    ds = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_K,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + ds
        dmask = cols < D
        v = tl.load(v_ptr + b * stride_vb + cols.to(tl.int64) * stride_vd, mask=dmask, other=0.0).to(tl.float32)
        w = tl.load(row_ptr[:, None] + cols[None, :].to(tl.int64) * stride_md,
                    mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * v[None, :], axis=1)
    tl.store(out_ptr + b * K1 + ks, tl.where(valid, acc, float("nan")), mask=kmask)


@triton.jit(do_not_specialize=["K1", "N"])
def _grad_kernel(
    g_ptr, stride_gb, stride_gk,        # [B, K+1] d loss / d scores, fp32/fp16/bf16, any strides
    m_ptr, stride_mn, stride_md,        # [N, d] memory bank
    idx_ptr, stride_ib, stride_ik,      # [B, K+1] bank rows
    part_ptr,                           # [B, SPLIT, d] fp32 out: each slice's partial sum
    K1, D, N, SPLIT, K_PER_SPLIT, NUM_DB,  # K+1, d, bank rows, slices per row, indices per slice, blocks of d
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    db = pid % NUM_DB
    split = (pid // NUM_DB) % SPLIT
    b = pid // (NUM_DB * SPLIT)
    cols = db * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = cols < D
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K1)
    acc = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        row_ptr, kmask, valid = _bank_rows(m_ptr, stride_mn, idx_ptr, stride_ik, b * stride_ib, ks, k_end, N)
        g = tl.load(g_ptr + b * stride_gb + ks.to(tl.int64) * stride_gk, mask=kmask, other=0.0).to(tl.float32)
        g = tl.where(valid | ~kmask, g, float("nan"))  # an index outside [0, N): NaN (times the 0 loaded)
        w = tl.load(row_ptr[:, None] + cols[None, :].to(tl.int64) * stride_md,
                    mask=valid[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += w * g[:, None]
    tl.store(part_ptr + (b * SPLIT + split) * D + cols, tl.sum(acc, axis=0), mask=dmask)


# --------------------------------------------------------------------------- launch configuration

def forward_config(num_indices: int, dim: int) -> dict:
    """BLOCK_K, BLOCK_D and num_warps of the forward for K+1 = ``num_indices`` and d = ``dim``: d in
    blocks of up to 128 columns, 8192 elements a tile (64 rows at d = 128), fewer rows for short K."""
    block_d = min(pow2_at_least(max(dim, 16)), 128)
    block_k = min(max(8192 // block_d, 16), pow2_at_least(max(num_indices, 16)))
    return {"BLOCK_K": block_k, "BLOCK_D": block_d, "num_warps": 4}


def backward_config(batch: int, num_indices: int, dim: int) -> dict:
    """BLOCK_K, BLOCK_D, num_warps and SPLIT of the backward: 4096-element tiles (32 rows at d = 128), and
    each row of idx cut into SPLIT slices so that the grid has about 2048 programs (8 slices at B = 256)."""
    block_d = min(pow2_at_least(max(dim, 16)), 128)
    block_k = min(max(4096 // block_d, 16), pow2_at_least(max(num_indices, 16)))
    num_db = triton.cdiv(dim, block_d)
    split = max(1, min(triton.cdiv(num_indices, block_k), triton.cdiv(2048, batch * num_db)))
    return {"BLOCK_K": block_k, "BLOCK_D": block_d, "num_warps": 4, "SPLIT": split}


# --------------------------------------------------------------------------- launchers (no checks)

def crd_scores_triton(v: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor, *,
                      block_k: int | None = None, block_d: int | None = None) -> torch.Tensor:
    """Launch the forward on valid inputs: float32 scores [B, K+1], s[b, k] = <memory[idx[b, k]], v[b]>.
    ``block_k`` / ``block_d`` (powers of two >= 16) override :func:`forward_config` (the tests of the loops)."""
    batch, dim = v.shape
    k1 = idx.shape[1]
    out = torch.empty(batch, k1, dtype=torch.float32, device=v.device)
    if batch == 0 or k1 == 0:
        return out
    cfg = forward_config(k1, dim)
    bk, bd = block_k or cfg["BLOCK_K"], block_d or cfg["BLOCK_D"]
    num_kb = triton.cdiv(k1, bk)
    _scores_kernel[(batch * num_kb,)](
        v, v.stride(0), v.stride(1), memory, memory.stride(0), memory.stride(1), idx, idx.stride(0), idx.stride(1),
        out, k1, dim, memory.shape[0], num_kb, BLOCK_K=bk, BLOCK_D=bd, num_warps=cfg["num_warps"])
    return out


def crd_scores_grad_triton(grad_scores: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor, *,
                           out_dtype: torch.dtype = torch.float32, block_k: int | None = None,
                           block_d: int | None = None, split: int | None = None) -> torch.Tensor:
    """Launch the backward on valid inputs: grad_v [B, d] in ``out_dtype``, grad_v[b] = sum_k
    grad_scores[b, k] memory[idx[b, k]] summed in float32. ``block_k``, ``block_d`` and ``split``
    override :func:`backward_config` (the tests of the loops and of the slices)."""
    batch, k1 = grad_scores.shape
    dim = memory.shape[1]
    if batch == 0 or k1 == 0:
        return torch.zeros(batch, dim, dtype=out_dtype, device=memory.device)
    cfg = backward_config(batch, k1, dim)
    bk, bd = block_k or cfg["BLOCK_K"], block_d or cfg["BLOCK_D"]
    slices = max(1, min(split or cfg["SPLIT"], triton.cdiv(k1, bk)))
    per_slice = triton.cdiv(triton.cdiv(k1, bk), slices) * bk
    slices = triton.cdiv(k1, per_slice)  # no empty slice
    num_db = triton.cdiv(dim, bd)
    part = torch.empty(batch, slices, dim, dtype=torch.float32, device=memory.device)
    _grad_kernel[(batch * slices * num_db,)](
        grad_scores, grad_scores.stride(0), grad_scores.stride(1), memory, memory.stride(0), memory.stride(1),
        idx, idx.stride(0), idx.stride(1), part, k1, dim, memory.shape[0], slices, per_slice, num_db,
        BLOCK_K=bk, BLOCK_D=bd, num_warps=cfg["num_warps"])
    grad = part[:, 0] if slices == 1 else part.sum(dim=1)
    return grad.to(out_dtype)


# --------------------------------------------------------------------------- autograd, eager twin, entry

class CRDScores(torch.autograd.Function):
    """s = <memory[idx], v> by the fused kernels: forward :func:`crd_scores_triton`, backward
    :func:`crd_scores_grad_triton` (grad wrt v only, in v's dtype). The backward reads the bank as it is
    then: a bank changed in place after the forward (CRD's momentum update) makes autograd raise
    (the bank is saved for the backward, so its version counter is checked) instead of using new rows.
    :mod:`kcd_fast.distillers.crd` therefore runs the backward kernel inside its loss's forward, before
    its update."""

    @staticmethod
    def forward(ctx, v, memory, idx):
        ctx.save_for_backward(memory, idx)
        ctx.v_dtype = v.dtype
        return crd_scores_triton(v, memory, idx)

    @staticmethod
    def backward(ctx, grad_scores):
        memory, idx = ctx.saved_tensors
        grad_v = None
        if ctx.needs_input_grad[0]:
            grad_v = crd_scores_grad_triton(grad_scores, memory, idx, out_dtype=ctx.v_dtype)
        return grad_v, None, None


def crd_scores_torch(v: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The eager twin: ``torch.bmm(memory[idx], v.unsqueeze(2))`` in float32 (the gathered [B, K+1, d]
    rows written out), float32 [B, K+1]. Gradients flow to v (and to memory if it asks for them)."""
    with torch.autocast(v.device.type, enabled=False):  # float32 also under autocast, as the kernels
        return torch.bmm(memory[idx].float(), v.float().unsqueeze(2)).squeeze(2)


def crd_scores_grad_torch(grad_scores: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The eager twin of the backward: float32 [B, d], sum_k grad_scores[b, k] memory[idx[b, k]]."""
    with torch.autocast(memory.device.type, enabled=False):
        return torch.bmm(grad_scores.float().unsqueeze(1), memory[idx].float()).squeeze(1)


def check_scores_inputs(op: str, v, memory, idx) -> None:
    """v [B, d] and memory [N, d] float32/float16/bfloat16, idx int32/int64 [B, K+1] with entries in
    [0, N) (a content check: on the CPU, and on CUDA in debug mode), all on one device, B, d, N, K+1 >= 1;
    the bank must not require grad (no gradient flows to it)."""
    check_tensor(op, "v", v, LOGIT_DTYPES, 2)
    check_tensor(op, "memory", memory, LOGIT_DTYPES, 2)
    check_tensor(op, "idx", idx, INDEX_DTYPES, 2)
    check_same_device(op, "v", v, memory=memory, idx=idx)
    batch, dim = v.shape
    if batch < 1 or dim < 1:
        raise ValueError(f"{op}: `v` must be [B, d] with B, d >= 1, got shape {tuple(v.shape)}")
    if memory.shape[0] < 1 or memory.shape[1] != dim:
        raise ValueError(f"{op}: `memory` must be [N, d] with N >= 1 and d = v.shape[1] = {dim}, "
                         f"got shape {tuple(memory.shape)}")
    if idx.shape[0] != batch or idx.shape[1] < 1:
        raise ValueError(f"{op}: `idx` must be [B, K+1] with B = v.shape[0] = {batch} and K+1 >= 1, "
                         f"got shape {tuple(idx.shape)}")
    if memory.requires_grad:
        raise ValueError(f"{op}: `memory` must not require grad: no gradient flows to the bank (a buffer "
                         f"moved by momentum); pass memory.detach()")
    check_index_range(op, "idx", idx, memory.shape[0])


def crd_scores(v: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor, *, fused: bool | None = None) -> torch.Tensor:
    """Validated scores, float32 [B, K+1], s[b, k] = <memory[idx[b, k]], v[b]>, differentiable wrt v.

    ``fused`` None: the Triton kernels (:class:`CRDScores`) for CUDA tensors, the eager twin
    :func:`crd_scores_torch` elsewhere; True: the kernels anywhere (on the CPU under
    ``TRITON_INTERPRET=1``); False: the twin. Both give the same float32 sums to rounding."""
    check_scores_inputs("crd_scores", v, memory, idx)
    if fused is None:
        fused = v.is_cuda
    if fused:
        return CRDScores.apply(v, memory, idx)
    return crd_scores_torch(v, memory, idx)
