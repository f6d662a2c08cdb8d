"""Public operators of kcd_fast: the per-step value recording and the stage-end condensation.

=====================  ==========================================  ===============================
op                     CPU                                         CUDA
=====================  ==========================================  ===============================
``update_values``      C++ kernel                                  one fused Triton kernel
``rank``               C++ parallel LSD radix sort                 CUB radix sort, int32 payloads
``condense``           ``rank`` + torch partition                  ``rank`` + torch partition
``vaks_mix_``          C++ kernel                                  one fused CUDA kernel
=====================  ==========================================  ===============================

All ops give the same results on both devices (``update_values`` to about 1e-6; ``rank`` for
counts below 512) and are specified by
:mod:`kcd_fast.reference` (float64). Every op validates its arguments and
raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape,
device, range or value) naming the argument and what was expected, before it
changes any state.

Checks that need the tensors' *contents* (indices in range, no duplicate
destinations, eps in [0, 1]) would make the host wait for the GPU. They always
run on the CPU; on CUDA they run only in debug mode (:func:`set_debug` or the
environment variable ``KCD_FAST_DEBUG=1``). Without debug mode, the CUDA
``update_values`` still never writes outside ``values``/``counts``: it skips an
out-of-range index and raises a flag that :func:`check_errors` (called by the
condenser at each stage end) turns into an error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from kcd_fast import extension
from kcd_fast.checks import (INDEX_DTYPES, LOGIT_DTYPES, check_choice, check_flag, check_index_range, check_matching,
                             check_real, check_same_device, check_temperature, check_tensor, check_vaks_pairs,
                             checks_contents, debug_enabled, set_debug)

__all__ = [
    "update_values",
    "rank",
    "condense",
    "CondensePlan",
    "K0_POLICIES",
    "record_last_visit_",
    "vaks_mix_",
    "vaks_mix_topk_",
    "set_debug",
    "debug_enabled",
    "check_errors",
    "existing_error_flag",
    "out_of_range_error",
]

_BUFFER_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)
K0_POLICIES = ("dropped", "all", "window")  # the partners of the augmentation: see condense()


def _check_state(op: str, values, counts) -> None:
    check_tensor(op, "values", values, (torch.float32,), 1)
    check_matching(op, "counts", counts, (torch.int32,), "values", values)


# --------------------------------------------------------------------------- update_values (Eq. 7 + 12)

_error_flags: dict[torch.device, torch.Tensor] = {}


def _canonical_device(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: the flags are keyed by the tensors' own devices, which carry an index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _error_flag(device: torch.device) -> torch.Tensor:
    device = _canonical_device(device)
    flag = _error_flags.get(device)
    if flag is None:
        if torch.cuda.is_current_stream_capturing():
            # Made inside a capture, the flag would live in the graph's pool and every replay would
            # zero it again, losing earlier replays' errors (and Triton cannot compile there either).
            raise RuntimeError("update_values: call it once outside CUDA-graph capture first (a warm-up step), "
                               f"so that it compiles its kernel and allocates {device}'s error flag there")
        flag = _error_flags[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return flag


def check_errors(device: torch.device | str | None = None) -> None:
    """Raise if a CUDA ``update_values`` call skipped an out-of-range index since the last check.

    This synchronises with the GPU; call it where a sync is cheap (a stage
    end, an epoch end). The flag is cleared.
    """
    devices = list(_error_flags) if device is None else [torch.device(device)]
    for dev in devices:
        flag = existing_error_flag(dev)
        if flag is not None and int(flag.item()) != 0:
            flag.zero_()
            raise out_of_range_error(str(_canonical_device(dev)))


def existing_error_flag(device: torch.device) -> torch.Tensor | None:
    """The error flag of ``device`` (int32 [1], nonzero once a CUDA ``update_values`` skipped an index) if
    one was ever made; it never is on the CPU, which raises at once. Reading it is up to the caller."""
    return _error_flags.get(_canonical_device(device))


def out_of_range_error(where: str) -> ValueError:
    """What :func:`check_errors` raises for indices the CUDA kernel skipped on ``where``."""
    return ValueError(f"update_values: `indices` held values outside [0, N) on {where}; those visits were not "
                      f"recorded. Run with KCD_FAST_DEBUG=1 to fail at the offending call.")


def _check_update_args(op: str, values, counts, indices, logits) -> None:
    """Everything about update_values' tensors that needs no look at their contents (no sync)."""
    _check_state(op, values, counts)
    check_tensor(op, "indices", indices, INDEX_DTYPES, 1)
    check_tensor(op, "logits", logits, LOGIT_DTYPES, 2)
    check_same_device(op, "values", values, indices=indices, logits=logits)
    if logits.shape[0] != indices.shape[0]:
        raise ValueError(f"{op}: `logits` must have one row per index ({indices.shape[0]}), "
                         f"got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError(f"{op}: `logits` must have at least one class, got shape {tuple(logits.shape)}")
    if not values.is_contiguous() or not counts.is_contiguous():
        raise ValueError(f"{op}: `values` and `counts` must be contiguous (they are updated in place)")
    if values.requires_grad or counts.requires_grad:
        raise ValueError(f"{op}: `values` and `counts` must not require grad: they are state, updated in place")


def _update_values_cuda(values, counts, indices, logits, temperature: float) -> torch.Tensor:
    from kcd_fast.kernels.update_values import update_values_triton

    with torch.cuda.device(logits.device):
        return update_values_triton(values, counts, indices, logits, temperature, _error_flag(logits.device))


def update_values(values: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor, logits: torch.Tensor, *,
                  temperature: float = 1.0) -> torch.Tensor:
    """Record the student's prediction entropy of a batch (Eq. 7) into the running values (Eq. 12).

    Args:
        values: float32 [N], V^F(x), the running mean entropy of every sample. Updated in place
            (its version counter too, as torch's in-place ops do); must not require grad.
        counts: int32 [N], F(x), how often each sample was recorded. Updated in place.
        indices: int32 or int64 [B], the dataset indices of the batch's samples.
            A duplicate index is a successive visit (exactly as k updates in batch order).
        logits: [B, C] float32, float16 or bfloat16, any strides: the student's logits.
        temperature: softmax temperature of the entropy, > 0, with 1/T a finite float32
            (T >= 2.9e-39). May change between calls, under ``torch.compile`` too.

    Returns:
        float32 [B]: each row's entropy H(softmax(logits / temperature)).
        A row with a non-finite logit gets NaN and is not recorded. Every kernel works in fp32,
        so so does a row whose scaled logits overflow it: |x| / T > 3.4e38, or a spread
        max - min of the scaled logits beyond 3.4e38.

    On CUDA this is one fused Triton kernel with no host synchronisation, safe
    inside CUDA-graph capture (after one call outside it, which compiles the kernel
    and allocates the device's error flag), under autocast and no_grad; it never
    builds an autograd graph. On the CPU it is a C++ kernel (rows in parallel, then the
    visits applied in batch order). Works under ``torch.compile`` as the operator
    ``torch.ops.kcd_fast.update_values``.
    """
    op = "update_values"
    _check_update_args(op, values, counts, indices, logits)
    logits = logits.detach()
    if torch.compiler.is_compiling():
        # Reading the indices would break the graph, and a temperature that changes between calls is
        # traced as a symbol: the operator checks both when it runs (check_temperature).
        extension.require(op)
        return torch.ops.kcd_fast.update_values(values, counts, indices, logits, temperature)
    temperature = check_temperature(op, temperature)
    if logits.device.type == "cuda":
        check_index_range(op, "indices", indices, values.numel())  # in debug mode (it synchronises)
        entropy = _update_values_cuda(values, counts, indices, logits, temperature)
    else:
        # The C++ kernel checks every index before it changes anything, raising the same ValueError
        # as check_index_range (one pass fewer over the indices than checking here too).
        extension.require(op)  # the CUDA kernel of this op is the Triton kernel, registered below
        entropy = torch.ops.kcd_fast.update_values(values, counts, indices, logits, temperature)
    # As torch's own in-place ops do, so that autograd refuses a graph that saved the old values.
    torch.autograd.graph.increment_version((values, counts))
    return entropy


def record_last_visit_(last_values: torch.Tensor, indices: torch.Tensor, entropy: torch.Tensor) -> None:
    """A record of each sample's last visit: ``last_values[i]`` becomes the entropy of i's LAST finite
    visit in the batch (the "w/o OVR" ablation's value, and the official code's per-epoch entry).

    Deterministic on every device, with no host sync: where an index occurs more than once in the
    batch (a sampler with replacement), a plain ``index_put_`` has no defined winner on CUDA. Here
    each batch position's key (index, finite, position) is sorted; the last key of an index's run
    is its latest finite visit, or a non-finite one if it has none (then the old value stays). Every
    position then writes the value of its run's last key, so duplicates write the same number.
    An index outside [0, N) (flagged by :func:`update_values`) records nothing.
    """
    n, b = last_values.numel(), indices.numel()
    if b == 0:
        return
    idx = indices.to(last_values.device).long()
    in_range = (idx >= 0) & (idx < n)
    idx = torch.where(in_range, idx, 0)
    fresh = torch.isfinite(entropy) & in_range
    pos = torch.arange(b, device=idx.device)
    keys, order = torch.sort(idx * (2 * b) + fresh.long() * b + pos)
    run = keys // (2 * b)                                   # the sorted indices
    last = torch.searchsorted(run, run, right=True) - 1     # each position's run end
    winner = order[last]
    value = torch.where(fresh[winner], entropy[winner].float(), last_values[run])
    last_values.index_put_((run,), value)


# --------------------------------------------------------------------------- rank (Eq. 13)


def rank(values: torch.Tensor, counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Cost-aware ranking R_V (Eq. 13): points by V^F * F^alpha, descending.

    Args:
        values: float32 [N], counts: int32 [N] (as in :func:`update_values`).
        alpha: the cost weight, >= 0 (the paper uses 0.03; 0 ranks by value only).

    Returns:
        int64 [N] ``order``: ``order[r]`` is the point at rank position r. The
        score is computed in float64 and ranked at float32 precision; equal
        keys are ordered by the lower index. ``values`` must be finite: checked on the
        CPU, and on CUDA in debug mode (unchecked, a NaN score ranks last).

    CPU: a parallel LSD radix sort in C++. CUDA: a CUB radix sort of the keys
    carrying int32 payloads. No host synchronisation on CUDA.
    """
    op = "rank"
    _check_state(op, values, counts)
    alpha = check_real(op, "alpha", alpha, lo=0.0)
    if checks_contents(values.device) and values.numel():
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{op}: `values` must be finite")
        if int(counts.min()) < 0:
            raise ValueError(f"{op}: `counts` must be >= 0, found {int(counts.min())}")
    extension.require(op, values.device)
    return torch.ops.kcd_fast.rank(values, counts, alpha)


# --------------------------------------------------------------------------- condense (Eq. 8, 13-15)


@dataclass
class CondensePlan:
    """The outcome of one E-step over the whole knowledge space.

    Attributes:
        keep: bool [N], the value label y (Eq. 8): the condensed set K^ = K1.
        order: int64 [N], the ranking R_V (Eq. 13), most valuable first.
        k1l: int64 [L], the lowest-ranked kept points, augmented (Sec. 3.4), most valuable first.
        k0: int64 [L], their partners from K0, most valuable first (Eq. 14).
        eps: float32 [L], the perturbation ratio of each pair (Eq. 15).
        num_kept: |K1|.
        num_k0: |K0| (before truncation to L = min(|K0|, |K1|) pairs).
    """

    keep: torch.Tensor
    order: torch.Tensor
    k1l: torch.Tensor
    k0: torch.Tensor
    eps: torch.Tensor
    num_kept: int
    num_k0: int

    @property
    def k1h(self) -> torch.Tensor:
        """int64 [|K1| - L], the kept points that are not augmented, most valuable first."""
        return self.order[: self.num_kept - self.k1l.numel()]


def _num_kept(op: str, keep, n: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, (Integral, Real)):
        raise TypeError(f"{op}: `keep` must be a count (int) or a fraction (float), got {type(keep).__name__}")
    if isinstance(keep, Integral):
        if not 1 <= int(keep) <= n:
            raise ValueError(f"{op}: `keep` as a count must lie in [1, {n}], got {keep}")
        return int(keep)
    frac = check_real(op, "keep", keep, lo=0.0, hi=1.0, lo_open=True)
    # floor(tau N), with a slack that scales with N for the float64 rounding of the product
    # (0.29 * 10**8 = 28999999.999999996): the rounding of reference.kept_count.
    x = frac * n
    count = int(math.floor(x + max(1e-9, 1e-12 * x)))
    if count < 1:
        raise ValueError(f"{op}: `keep`={frac} keeps no point of {n}")
    return count


def condense(values: torch.Tensor, counts: torch.Tensor, *, keep, alpha: float, eps_max: float,
             previous_keep: torch.Tensor | None = None, k0: str = "dropped", adaptive_eps: bool = True,
             order: torch.Tensor | None = None) -> CondensePlan:
    """One E-step (Alg. 1, lines 9-13): rank, label, partition and pair the knowledge points.

    Args:
        values, counts: the recorded V^F and F (see :func:`update_values`).
        keep: |K1| as a count, or as a fraction tau of N (floor(tau N) points).
        alpha: cost weight of Eq. 13 (>= 0).
        eps_max: eps_m of Eq. 15, in [0, 1].
        previous_keep: bool [N], the condensed set in force until now (None: all points).
        k0: which points form K0, the partners of the augmentation:

            * ``"dropped"``: the points in ``previous_keep`` that are not kept now.
              Only knowledge that just left the set is mixed in, so the augmentation
              follows the condensation step by step.
            * ``"all"`` (the paper's text, Sec. 3.4): every point with y = 0,
              most valuable first.
            * ``"window"`` (the official code's pairing): the rank positions
              [|K1|, |previous_keep|) of this ranking, the points ranked just below
              the new cut, whether or not they were kept before.

            Each pairs |K1L| = min(|K0|, |K1|) points, the lowest-ranked kept ones, in rank
            order with K0's: the best K1L point with the best K0 point.
        adaptive_eps: True for Eq. 15's linear ramp; False is the ablation eps = eps_m.
        order: a precomputed ranking to use instead of :func:`rank` (e.g. a
            random permutation for the "OGVE w/ random" ablation).

    Returns:
        A :class:`CondensePlan` on the input's device. This synchronises once
        (the number of pairs is data-dependent); it runs once per stage.
    """
    op = "condense"
    _check_state(op, values, counts)
    n = values.numel()
    n_keep = _num_kept(op, keep, n)
    alpha = check_real(op, "alpha", alpha, lo=0.0)
    eps_max = check_real(op, "eps_max", eps_max, lo=0.0, hi=1.0)
    check_choice(op, "k0", k0, K0_POLICIES)
    check_flag(op, "adaptive_eps", adaptive_eps)  # not merely truthy: "no" would mean the ramp
    if previous_keep is not None:
        check_matching(op, "previous_keep", previous_keep, (torch.bool,), "values", values)
    if order is None:
        order = rank(values, counts, alpha)
    else:
        check_matching(op, "order", order, (torch.int64,), "values", values)
        if checks_contents(order.device) and not torch.equal(
                torch.sort(order).values, torch.arange(n, device=order.device)):
            raise ValueError(f"{op}: `order` must be a permutation of 0..{n - 1}")
    device = values.device
    keep_mask = torch.zeros(n, dtype=torch.bool, device=device)
    keep_mask[order[:n_keep]] = True
    rest = order[n_keep:]
    if k0 == "dropped" and previous_keep is not None:
        k0_set = rest[previous_keep[rest]]
    elif k0 == "window":
        previous = n if previous_keep is None else int(previous_keep.sum())  # a stage end: one sync is cheap
        k0_set = rest[: max(previous - n_keep, 0)]
    else:  # "all", or "dropped" with everything kept before
        k0_set = rest
    pairs = min(k0_set.numel(), n_keep)
    k1l = order[n_keep - pairs:n_keep]
    if adaptive_eps:
        eps = (eps_max / max(pairs, 1)) * torch.arange(pairs, device=device, dtype=torch.float64)
    else:
        eps = torch.full((pairs,), eps_max, device=device, dtype=torch.float64)
    return CondensePlan(keep=keep_mask, order=order, k1l=k1l, k0=k0_set[:pairs], eps=eps.float(),
                        num_kept=n_keep, num_k0=int(k0_set.numel()))


# --------------------------------------------------------------------------- vaks_mix_ (Eq. 14)


def vaks_mix_(buffer: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, eps) -> torch.Tensor:
    """Adaptive knowledge augmentation (Eq. 14), in place: ``buffer[dst] = (1-eps) buffer[dst] + eps buffer[src]``.

    Args:
        buffer: [N, ...] contiguous float32, float16, bfloat16 or uint8 (images
            or soft labels). The math is fp32; uint8 rounds to nearest (ties to
            even). The mix is convex, so soft-label rows stay normalised. Must not
            require grad; its version counter is bumped, as torch's in-place ops do.
        dst: int32/int64 [P], the rows to augment (K1L). Must be distinct.
        src: int32/int64 [P], their partners (K0). Must not share an index with
            ``dst``: a row is never both read as a partner and written.
        eps: float tensor [P] (or a number for all pairs), each in [0, 1].

    Returns ``buffer``. One fused kernel on CUDA (gather, mix, scatter), a C++
    kernel on the CPU. The content checks (range, distinct, disjoint, eps in
    [0, 1]) always run on the CPU and in debug mode on CUDA.
    """
    op = "vaks_mix_"
    check_tensor(op, "buffer", buffer, _BUFFER_DTYPES)
    if buffer.dim() < 1:
        raise ValueError(f"{op}: `buffer` must be [N, ...], got a 0-d tensor")
    if not buffer.is_contiguous():
        raise ValueError(f"{op}: `buffer` must be contiguous")
    _not_requiring_grad(op, buffer=buffer)
    dst_l, src_l, eps_t = check_vaks_pairs(op, "buffer", buffer, dst, src, eps)
    extension.require(op, buffer.device)
    if dst_l.numel():
        torch.ops.kcd_fast.vaks_mix_(buffer, dst_l, src_l, eps_t)
        torch.autograd.graph.increment_version(buffer)  # as in update_values
    return buffer


def _not_requiring_grad(op: str, **tensors: torch.Tensor) -> None:
    """Tensors an op writes in place must not require grad: the kernels write them outside autograd."""
    for name, t in tensors.items():
        if t.requires_grad:
            raise ValueError(f"{op}: `{name}` must not require grad: it is written in place, outside autograd")


def vaks_mix_topk_(values: torch.Tensor, classes: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, eps,
                   num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 14 on top-k soft labels, in place: row ``dst`` becomes the top k of the mixed dense rows.

    Each row holds the k largest probabilities (``values`` [N, k], fp32/fp16/bf16) and their
    classes (``classes`` [N, k], int32); the rest of the mass, 1 - sum(values), is spread
    uniformly over the other ``num_classes - k`` classes. The mix
    ``(1 - eps) decode(dst) + eps decode(src)`` is truncated back to its k largest entries (ties to
    the lower class) and the truncated mass returns to the uniform remainder, so rows stay
    normalised; what is lost is the shape of the mass outside the top k. Math in fp32; one thread
    per pair on CUDA, a C++ loop on the CPU. ``dst``, ``src`` and ``eps`` as in :func:`vaks_mix_`;
    k <= 64; the classes of rows ``dst`` and ``src`` in [0, num_classes) (checked with the other
    contents). Returns (values, classes).
    """
    op = "vaks_mix_topk_"
    check_tensor(op, "values", values, (torch.float32, torch.float16, torch.bfloat16), 2)
    check_matching(op, "classes", classes, (torch.int32,), "values", values)
    if not (values.is_contiguous() and classes.is_contiguous()):
        raise ValueError(f"{op}: `values` and `classes` must be contiguous")
    _not_requiring_grad(op, values=values)
    k = values.shape[1]
    if not 1 <= k <= 64:
        raise ValueError(f"{op}: k (the width of `values`) must lie in [1, 64], got {k}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < k:
        raise ValueError(f"{op}: `num_classes` must be an int >= k ({k}), got {num_classes!r}")
    dst_l, src_l, eps_t = check_vaks_pairs(op, "values", values, dst, src, eps)
    if dst_l.numel() and checks_contents(values.device):  # the rows the mix reads
        check_index_range(op, "classes", classes.index_select(0, torch.cat([dst_l, src_l])), int(num_classes))
    extension.require(op, values.device)
    if dst_l.numel():
        torch.ops.kcd_fast.vaks_mix_topk_(values, classes, dst_l, src_l, eps_t, int(num_classes))
        torch.autograd.graph.increment_version((values, classes))
    return values, classes


if extension.available():
    @torch.library.impl("kcd_fast::update_values", "CUDA")
    def _update_values_cuda_op(values, counts, indices, logits, temperature):
        # Called through torch.ops.kcd_fast (torch.compile, or a user): the kernel's own assumptions,
        # checked without reading any tensor's contents (an index out of range raises the error flag).
        op = "kcd_fast::update_values"
        _check_update_args(op, values, counts, indices, logits)
        return _update_values_cuda(values, counts, indices, logits, check_temperature(op, temperature))

    @torch.library.register_fake("kcd_fast::update_values")
    def _update_values_fake(values, counts, indices, logits, temperature):
        return logits.new_empty((logits.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("kcd_fast::rank")
    def _rank_fake(values, counts, alpha):
        return values.new_empty(values.shape, dtype=torch.int64)

    @torch.library.register_fake("kcd_fast::vaks_mix_")
    def _vaks_mix_fake(buffer, dst, src, eps):
        return None

    @torch.library.register_fake("kcd_fast::vaks_mix_topk_")
    def _vaks_mix_topk_fake(values, classes, dst, src, eps, num_classes):
        return None
