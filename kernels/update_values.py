"""Fused softmax entropy + online value recording (Eq. 7 and Eq. 12), one Triton kernel.

Installed as ``kcd_fast.kernels.update_values``. The public, validated entry
point is :func:`kcd_fast.ops.update_values`; :func:`update_values_triton`
here is the raw launcher (no argument checks beyond what the launch needs).

One program handles one row ``b`` of the batch:

1. it computes the entropy of ``softmax(logits[b] / T)`` in fp32,
   H = log s - t / s with m the row's max, s = sum e^(z-m) and
   t = sum e^(z-m) (z-m), and writes it to ``entropy[b]`` (NaN if a logit is
   not finite);
2. it scans the batch's indices: the program of the *first* occurrence of an
   index owns that sample. The owner recomputes the entropies of the later
   duplicates (rare; none with a sampler without replacement), and writes
   F' = F + k and V' = V + (sum_e - k V) / F' for its k finite visits: the
   exact result of k successive Eq. 12 updates. No other program writes the
   sample, so there are no atomics and no races, and the result does not
   depend on scheduling.

A launch takes one of two paths, which agree with the float64 reference to fp32 rounding:

* **one tile** (C <= 4096 and B <= 1024, :func:`one_tile`): a single block holds
  the row and the batch's indices, and two block reductions do everything:
  (max, duplicates before, duplicates after), then (s, t). On an H200 this
  takes 2.4 us at B = 256, C = 1000 in fp32 (CUDA-graph replay, launch excluded).
* **chunked** (any other shape): the row in 4096-wide chunks with an online
  max and rescaled running sums, then the indices in 1024-wide chunks.

Each program reads its sample's (F, V) together with idx (one tile: with the
row, before the reductions; chunked: after the row's chunks), so that the
owner's update waits on no memory round trip of its own after the
reductions; the rare duplicate path reads it again after its loop.

Rows are read 16 bytes at a time where C and the row stride allow it
(:func:`row_vector_width`). No host synchronisation, no allocation but the
output, safe under CUDA-graph capture. Indices outside [0, N) are not
recorded; ``error_flag[0]`` is set to 1 instead so that a later,
synchronising check can report them.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import pow2_at_least

__all__ = ["update_values_triton", "launch_config", "block_sizes", "row_vector_width", "one_tile"]


@triton.jit
def _add_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _max_add_add(m0, a0, b0, m1, a1, b1):
    return tl.maximum(m0, m1), a0 + a1, b0 + b1


@triton.jit
def _finish(s, t):
    """H = log s - t / s (Eq. 7), and whether it is a number: a non-finite logit makes s NaN."""
    h = tl.log(s) - t / s
    return h, tl.abs(h) < float("inf")


@triton.jit
def _scaled_logits(row_ptr, cols, stride_c, C, inv_temperature):
    """z = x * inv_temperature for the columns ``cols`` of a row (-inf where masked or not finite),
    with ``mask`` (cols < C) and ``valid`` (in the row and finite: |x| < inf is false for +-inf, NaN)."""
    mask = cols < C
    x = tl.load(row_ptr + cols.to(tl.int64) * stride_c, mask=mask, other=0.0).to(tl.float32)
    valid = mask & (tl.abs(x) < float("inf"))
    return tl.where(valid, x * inv_temperature, float("-inf")), mask, valid


@triton.jit
def _poisoned_probs(d, mask, valid):
    """e^d for valid columns, 0 outside the row, NaN for a non-finite logit: it poisons the sums."""
    return tl.where(valid, tl.exp(d), tl.where(mask, float("nan"), 0.0))


@triton.jit
def _row_entropy(row_ptr, stride_c, C, inv_temperature, BLOCK_C: tl.constexpr):
    """Entropy of softmax(row * inv_temperature) in fp32 over BLOCK_C-wide chunks, and whether it is a number.

    row_ptr: pointer to the row's first logit; stride_c: element stride between
    classes; C: number of classes. A non-finite logit makes its p NaN instead of
    being counted, so the sums s and t turn NaN and the row reads as not finite:
    one block reduction fewer than counting them.
    """
    offs = tl.arange(0, BLOCK_C)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        z, mask, valid = _scaled_logits(row_ptr, c0 + offs, stride_c, C, inv_temperature)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # Rescale the running sums to the new max: e^(z-m') = e^(z-m) e^(m-m');
        # s == 0 until the first finite logit, where m - m' is -inf (and s is NaN,
        # so s > 0 is false, once a non-finite logit has been seen).
        shift = tl.where(s > 0, m - m_new, 0.0)
        scale = tl.exp(shift)
        # Sums rescaled to nothing add nothing, even where shift * s overflows (0 * -inf is NaN).
        t = tl.where(scale > 0, scale * (t + shift * s), 0.0)
        s = s * scale
        d = tl.where(valid, z - m_new, 0.0)
        p = _poisoned_probs(d, mask, valid)
        s += tl.sum(p, axis=0)
        t += tl.sum(p * d, axis=0)
        m = m_new
    return _finish(s, t)


@triton.jit
def _count_same(indices_ptr, stride_i, B, idx, row, BLOCK_B: tl.constexpr):
    """How many of the batch's indices equal idx before position row, and after it."""
    offs_b = tl.arange(0, BLOCK_B)
    n_before = tl.zeros((), tl.int32)
    n_after = tl.zeros((), tl.int32)
    for b0 in range(0, B, BLOCK_B):
        pos = b0 + offs_b
        other = tl.load(indices_ptr + pos.to(tl.int64) * stride_i, mask=pos < B, other=-1).to(tl.int64)
        same = (pos < B) & (other == idx)
        n_before += tl.sum((same & (pos < row)).to(tl.int32), axis=0)
        n_after += tl.sum((same & (pos > row)).to(tl.int32), axis=0)
    return n_before, n_after


@triton.jit
def _load_state(indices_ptr, stride_i, counts_ptr, values_ptr, row, N):
    """idx = indices[row], whether it is in [0, N), and its state F(idx), V(idx) (0 where it is not)."""
    idx = tl.load(indices_ptr + row * stride_i).to(tl.int64)
    in_range = (idx >= 0) & (idx < N)
    f_old = tl.load(counts_ptr + idx, mask=in_range, other=0)
    v_old = tl.load(values_ptr + idx, mask=in_range, other=0.0)
    return idx, in_range, f_old, v_old


@triton.jit
def _record(counts_ptr, values_ptr, idx, f_old, v_old, k, total):
    """k >= 1 successive Eq. 12 visits with entropies summing to ``total``, in one write:
    F' = F + k, V' = V + (total - k V) / F'."""
    f_new = f_old + k
    v_new = v_old + (total - k * v_old) / f_new.to(tl.float32)
    tl.store(counts_ptr + idx, f_new)
    tl.store(values_ptr + idx, v_new)


@triton.jit
def _tile_entropy(row_ptr, stride_c, C, inv_temperature, before, after, TILE: tl.constexpr):
    """Entropy of a row that fits one tile (C <= TILE), whether it is a number, and the sums of the
    [TILE] int32 flags ``before`` and ``after``, reduced in the same block reductions as the row:
    (max, before, after), then (s, t)."""
    z, mask, valid = _scaled_logits(row_ptr, tl.arange(0, TILE), stride_c, C, inv_temperature)
    m, n_before, n_after = tl.reduce((z, before, after), 0, _max_add_add)
    d = tl.where(valid, z - m, 0.0)
    p = _poisoned_probs(d, mask, valid)
    s, t = tl.reduce((p, p * d), 0, _add_pair)
    h, ok = _finish(s, t)
    return h, ok, n_before, n_after


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
    TILE: tl.constexpr,        # the one tile, >= C and >= B; 0: the chunked path
    VEC: tl.constexpr,         # the launcher guarantees VEC | C and VEC | stride_lb (1: no promise)
):
    # Written so that the compiler can prove every row's VEC-element chunks aligned, and load
    # them 16 bytes at a time; the values are unchanged, as VEC divides both.
    C = (C // VEC) * VEC
    stride_lb = (stride_lb // VEC) * VEC
    row = tl.program_id(0).to(tl.int64)
    # The sample's state (F, V) is read as soon as idx is known, not after the last reduction: a
    # memory round trip fewer on the hot path. Only idx's owner (below) writes it, after this read.
    if TILE > 0:
        # With the row and the batch's indices.
        idx, in_range, f_old, v_old = _load_state(indices_ptr, stride_i, counts_ptr, values_ptr, row, N)
        # Ownership: is this the first occurrence of idx? And how many duplicates follow?
        pos = tl.arange(0, TILE)
        other = tl.load(indices_ptr + pos.to(tl.int64) * stride_i, mask=pos < B, other=-1).to(tl.int64)
        same = (pos < B) & (other == idx)
        h, ok, n_before, n_after = _tile_entropy(
            logits_ptr + row * stride_lb, stride_lc, C, inv_temperature, (same & (pos < row)).to(tl.int32),
            (same & (pos > row)).to(tl.int32), TILE)
    else:
        h, ok = _row_entropy(logits_ptr + row * stride_lb, stride_lc, C, inv_temperature, BLOCK_C)
        # After the row's chunk loop (the compiler would wait for it before the loop), with the indices.
        idx, in_range, f_old, v_old = _load_state(indices_ptr, stride_i, counts_ptr, values_ptr, row, N)
        # Ownership, as above.
        n_before, n_after = _count_same(indices_ptr, stride_i, B, idx, row, BLOCK_B)
    tl.store(entropy_ptr + row, tl.where(ok, h, float("nan")))
    tl.store(error_ptr, 1, mask=~in_range)

    if in_range & (n_before == 0):
        if n_after == 0:
            # The common case, one visit: the state read at the start.
            if ok:
                _record(counts_ptr, values_ptr, idx, f_old, v_old, 1, h)
        else:
            # Recompute the later duplicates' entropies with the same routine,
            # so the recorded visits equal the returned entropies.
            k = ok.to(tl.int32)
            total = tl.where(ok, h, 0.0)
            offs_b = tl.arange(0, BLOCK_B)
            for b0 in range(0, B, BLOCK_B):
                pos_b = b0 + offs_b
                other_b = tl.load(indices_ptr + pos_b.to(tl.int64) * stride_i, mask=pos_b < B, other=-1).to(tl.int64)
                dup = (pos_b < B) & (other_b == idx) & (pos_b > row)
                n_dup = tl.sum(dup.to(tl.int32), axis=0)
                while n_dup > 0:
                    j = tl.min(tl.where(dup, pos_b, B), axis=0).to(tl.int64)
                    if TILE > 0:
                        no_flags = tl.zeros((TILE,), tl.int32)
                        hj, okj, _, _ = _tile_entropy(logits_ptr + j * stride_lb, stride_lc, C, inv_temperature,
                                                      no_flags, no_flags, TILE)
                    else:
                        hj, okj = _row_entropy(logits_ptr + j * stride_lb, stride_lc, C, inv_temperature, BLOCK_C)
                    k += okj.to(tl.int32)
                    total += tl.where(okj, hj, 0.0)
                    dup = dup & (pos_b != j)
                    n_dup -= 1
            if k > 0:
                # Read again on this rare path: kept live across the loop above, the early read is
                # spilled to the stack by ptxas right where it is loaded, which waits for it there,
                # on the hot path too.
                _record(counts_ptr, values_ptr, idx, tl.load(counts_ptr + idx), tl.load(values_ptr + idx), k, total)


def block_sizes(batch: int, num_classes: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_B, num_warps) for a [batch, num_classes] launch. BLOCK_B is 1024 for every
    batch (chunks of 1024 beyond), so that a short last batch (an epoch's, e.g. 143 rows after
    batches of 512) does not compile a kernel of its own mid-run, or inside a graph capture."""
    block_c = min(pow2_at_least(max(num_classes, 16)), 4096)
    block_b = 1024
    num_warps = 4 if block_c <= 1024 else 8
    return block_c, block_b, num_warps


def row_vector_width(logits: torch.Tensor) -> int:
    """Elements per 16-byte load that every row of ``logits`` [B, C] allows: the largest power of
    two up to 16 / element size dividing C and the row stride, with unit class stride; else 1.

    The kernel is told this width (``VEC``) so it can vectorise its masked row loads: C = 1000
    gives 4 (fp32) and 8 (bf16/fp16). Whether a row's base pointer is 16-byte aligned is Triton's
    own specialisation, so a misaligned tensor still loads correctly, element by element.
    """
    return _row_vector_width(logits.shape[1], logits.stride(0), logits.stride(1), logits.element_size())


def _row_vector_width(num_classes: int, stride_b: int, stride_c: int, element_size: int) -> int:
    if stride_c != 1 and num_classes > 1:
        return 1
    vec = 16 // element_size
    while vec > 1 and (num_classes % vec or stride_b % vec):
        vec //= 2
    return vec


def one_tile(batch: int, num_classes: int) -> int:
    """The one tile for a [batch, num_classes] launch, max(BLOCK_C, BLOCK_B); 0 if the row and the
    batch's indices do not both fit (C > 4096 or B > 1024), where the kernel takes the chunked path."""
    if num_classes > 4096 or batch > 1024:
        return 0
    block_c, block_b, _ = block_sizes(batch, num_classes)
    return max(block_c, block_b)


def launch_config(logits: torch.Tensor, *, num_warps: int | None = None, tile: bool | None = None,
                  vectorize: bool = True) -> dict:
    """The launch options and constexprs of the kernel for ``logits`` [B, C] (only its shape, strides
    and dtype are read): BLOCK_C, BLOCK_B, TILE, VEC and num_warps, with the overrides of
    :func:`update_values_triton`. Raises ValueError for ``tile=True`` on a shape without one tile.

    Worked out once per shape, strides, dtype and overrides (cached): it runs on every launch."""
    batch, num_classes = logits.shape
    return dict(_launch_config(batch, num_classes, logits.stride(0), logits.stride(1), logits.element_size(),
                               num_warps, tile, vectorize))


@functools.lru_cache(maxsize=256)
def _launch_config(batch, num_classes, stride_b, stride_c, element_size, num_warps, tile, vectorize):
    size = one_tile(batch, num_classes) if tile is None or tile else 0
    if tile and size == 0:
        raise ValueError(f"update_values_triton: tile=True needs C <= 4096 and B <= 1024 (one tile), "
                         f"got logits of shape [{batch}, {num_classes}]")
    block_c, block_b, default_warps = block_sizes(batch, num_classes)
    return (("BLOCK_C", block_c), ("BLOCK_B", block_b), ("TILE", size),
            ("VEC", _row_vector_width(num_classes, stride_b, stride_c, element_size) if vectorize else 1),
            ("num_warps", default_warps if num_warps is None else num_warps))


def update_values_triton(values: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor,
                         logits: torch.Tensor, temperature: float, error_flag: torch.Tensor, *,
                         num_warps: int | None = None, tile: bool | None = None,
                         vectorize: bool = True) -> torch.Tensor:
    """Launch the fused kernel; returns float32 [B] entropies. Inputs must be valid.

    The launch options, all with the same results to fp32 rounding: ``num_warps`` overrides
    :func:`block_sizes`' choice; ``tile`` picks the path (None: one tile where it fits, else
    chunked; True: one tile, a ValueError where it does not fit; False: chunked); and
    ``vectorize=False`` withholds :func:`row_vector_width`'s promise (element-wise row loads).
    ``benchmarks/sweep_update_values.py`` times them.
    """
    config = launch_config(logits, num_warps=num_warps, tile=tile, vectorize=vectorize)
    batch, num_classes = logits.shape
    entropy = torch.empty(batch, dtype=torch.float32, device=logits.device)
    if batch == 0:
        return entropy
    _update_values_kernel[(batch,)](
        logits, logits.stride(0), logits.stride(1),
        indices, indices.stride(0),
        values, counts, entropy, error_flag,
        batch, num_classes, values.numel(),
        1.0 / float(temperature),
        **config,
    )
    return entropy
