"""Fused softmax entropy + online value recording (Eq. 7 and Eq. 12), one Triton kernel.

Installed as ``kcd_fast.kernels.update_values``. The public, validated entry
point is :func:`kcd_fast.ops.update_values`; :func:`update_values_triton`
here is the raw launcher (no argument checks beyond what the launch needs).

One program handles one row ``b`` of the batch:

1. it computes the entropy of ``softmax(logits[b] / T)`` in fp32 with an online
   (single pass) max/sum, H = log s - t / s with s = sum e^(z-m),
   t = sum e^(z-m) (z-m), and writes it to ``entropy[b]`` (NaN if a logit is
   not finite);
2. it scans the batch's indices: the program of the *first* occurrence of an
   index owns that sample. The owner recomputes the entropies of the later
   duplicates (rare; none with a sampler without replacement), and writes
   F' = F + k and V' = V + (sum_e - k V) / F' for its k finite visits: the
   exact result of k successive Eq. 12 updates. No other program touches the
   sample, so there are no atomics and no races, and the result does not
   depend on scheduling.

No host synchronisation, no allocation but the output, safe under CUDA-graph
capture. Indices outside [0, N) are not recorded; ``error_flag[0]`` is set to
1 instead so that a later, synchronising check can report them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["update_values_triton", "block_sizes"]


@triton.jit
def _add_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _max_and_add(a0, a1, b0, b1):
    return tl.maximum(a0, b0), a1 + b1


@triton.jit
def _row_entropy(row_ptr, stride_c, C, inv_temperature, BLOCK_C: tl.constexpr, MERGED: tl.constexpr = False):
    """Entropy of softmax(row * inv_temperature) in fp32, and whether the row is finite.

    row_ptr: pointer to the row's first logit; stride_c: element stride between
    classes; C: number of classes. MERGED: do the four block reductions of a chunk
    as two two-operand reductions (an experiment towards P2; see sweep_update_values.py).
    """
    offs = tl.arange(0, BLOCK_C)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    bad = tl.zeros((), tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        mask = cols < C
        x = tl.load(row_ptr + cols.to(tl.int64) * stride_c, mask=mask, other=0.0).to(tl.float32)
        # |x| < inf is false for +-inf and NaN.
        valid = mask & (tl.abs(x) < float("inf"))
        z = tl.where(valid, x * inv_temperature, float("-inf"))
        if MERGED:
            z_max, n_bad = tl.reduce((z, (mask & ~valid).to(tl.int32)), 0, _max_and_add)
        else:
            n_bad = tl.sum((mask & ~valid).to(tl.int32), axis=0)
            z_max = tl.max(z, axis=0)
        bad += n_bad
        m_new = tl.maximum(m, z_max)
        # Rescale the running sums to the new max: e^(z-m') = e^(z-m) e^(m-m');
        # s == 0 until the first finite logit, where m - m' is -inf.
        shift = tl.where(s > 0, m - m_new, 0.0)
        scale = tl.exp(shift)
        t = scale * (t + shift * s)
        s = s * scale
        d = tl.where(valid, z - m_new, 0.0)
        p = tl.exp(d) * valid.to(tl.float32)
        if MERGED:
            ps, pt = tl.reduce((p, p * d), 0, _add_pair)
        else:
            ps = tl.sum(p, axis=0)
            pt = tl.sum(p * d, axis=0)
        s += ps
        t += pt
        m = m_new
    h = tl.log(s) - t / s
    return h, bad == 0


# B, C and N are not specialised on: Triton would otherwise compile a second kernel the first time a
# batch size is not a multiple of 16 (a condensed epoch's last batch), a 0.3 s stall mid-run.
@triton.jit(do_not_specialize=["B", "C", "N"])
def _update_values_kernel(
    logits_ptr,      # [B, C] fp32/fp16/bf16, element strides (stride_lb, stride_lc)
    stride_lb,
    stride_lc,
    indices_ptr,     # [B] int32/int64, element stride stride_i
    stride_i,
    values_ptr,      # [N] fp32, contiguous: V^F(x), updated in place
    counts_ptr,      # [N] int32, contiguous: F(x), updated in place
    entropy_ptr,     # [B] fp32, contiguous: output entropies
    error_ptr,       # [1] int32: set to 1 when an index is out of [0, N)
    B,
    C,
    N,
    inv_temperature,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    MERGED: tl.constexpr,  # two-operand block reductions (experiment, off by default)
):
    row = tl.program_id(0).to(tl.int64)
    h, ok = _row_entropy(logits_ptr + row * stride_lb, stride_lc, C, inv_temperature, BLOCK_C, MERGED)
    tl.store(entropy_ptr + row, tl.where(ok, h, float("nan")))

    idx = tl.load(indices_ptr + row * stride_i).to(tl.int64)
    in_range = (idx >= 0) & (idx < N)
    tl.store(error_ptr, 1, mask=~in_range)

    # Ownership: is this the first occurrence of idx? And how many duplicates follow?
    offs_b = tl.arange(0, BLOCK_B)
    n_before = tl.zeros((), tl.int32)
    n_after = tl.zeros((), tl.int32)
    for b0 in range(0, B, BLOCK_B):
        pos = b0 + offs_b
        other = tl.load(indices_ptr + pos.to(tl.int64) * stride_i, mask=pos < B, other=-1).to(tl.int64)
        same = (pos < B) & (other == idx)
        if MERGED:
            nb, na = tl.reduce(((same & (pos < row)).to(tl.int32), (same & (pos > row)).to(tl.int32)), 0, _add_pair)
        else:
            nb = tl.sum((same & (pos < row)).to(tl.int32), axis=0)
            na = tl.sum((same & (pos > row)).to(tl.int32), axis=0)
        n_before += nb
        n_after += na

    if in_range & (n_before == 0):
        k = ok.to(tl.int32)
        total = tl.where(ok, h, 0.0)
        if n_after > 0:
            # Recompute the later duplicates' entropies with the same routine,
            # so the recorded visits equal the returned entropies.
            for b0 in range(0, B, BLOCK_B):
                pos = b0 + offs_b
                other = tl.load(indices_ptr + pos.to(tl.int64) * stride_i, mask=pos < B, other=-1).to(tl.int64)
                dup = (pos < B) & (other == idx) & (pos > row)
                n_dup = tl.sum(dup.to(tl.int32), axis=0)
                while n_dup > 0:
                    j = tl.min(tl.where(dup, pos, B), axis=0).to(tl.int64)
                    hj, okj = _row_entropy(logits_ptr + j * stride_lb, stride_lc, C, inv_temperature, BLOCK_C,
                                           MERGED)
                    k += okj.to(tl.int32)
                    total += tl.where(okj, hj, 0.0)
                    dup = dup & (pos != j)
                    n_dup -= 1
        if k > 0:
            f_old = tl.load(counts_ptr + idx)
            v_old = tl.load(values_ptr + idx)
            f_new = f_old + k
            v_new = v_old + (total - k.to(tl.float32) * v_old) / f_new.to(tl.float32)
            tl.store(counts_ptr + idx, f_new)
            tl.store(values_ptr + idx, v_new)


def block_sizes(batch: int, num_classes: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_B, num_warps) for a [batch, num_classes] launch."""
    block_c = min(triton.next_power_of_2(max(num_classes, 16)), 4096)
    block_b = min(triton.next_power_of_2(max(batch, 16)), 1024)
    num_warps = 4 if block_c <= 1024 else 8
    return block_c, block_b, num_warps


def update_values_triton(values: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor,
                         logits: torch.Tensor, temperature: float, error_flag: torch.Tensor, *,
                         num_warps: int | None = None, merged_reductions: bool = False) -> torch.Tensor:
    """Launch the fused kernel; returns float32 [B] entropies. Inputs must be valid.

    ``num_warps`` overrides :func:`block_sizes`' choice, and ``merged_reductions`` does the block
    reductions in pairs: launch variants timed by ``benchmarks/sweep_update_values.py`` (target P2).
    """
    batch, num_classes = logits.shape
    entropy = torch.empty(batch, dtype=torch.float32, device=logits.device)
    if batch == 0:
        return entropy
    block_c, block_b, default_warps = block_sizes(batch, num_classes)
    num_warps = default_warps if num_warps is None else num_warps
    _update_values_kernel[(batch,)](
        logits, logits.stride(0), logits.stride(1),
        indices, indices.stride(0),
        values, counts, entropy, error_flag,
        batch, num_classes, values.numel(),
        1.0 / float(temperature),
        BLOCK_C=block_c, BLOCK_B=block_b, MERGED=bool(merged_reductions), num_warps=num_warps,
    )
    return entropy
