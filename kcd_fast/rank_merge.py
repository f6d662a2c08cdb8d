"""The DDP merge of per-sample records at a stage end: one all_reduce of what each rank recorded since
the last merge, after which every rank holds the state one process observing all batches would."""
from __future__ import annotations

import torch
import torch.distributed as dist

from kcd_fast import ops

__all__ = ["merge_ranks_"]


def merge_ranks_(values: torch.Tensor, counts: torch.Tensor, last_values: torch.Tensor | None, synced: tuple) -> tuple:
    """Merge every rank's records since ``synced`` (the state at the last merge) into ``values``,
    ``counts`` and ``last_values``, in place. Returns (the new ``synced``, how many OTHER ranks have
    their out-of-range flag raised).

    For each point, rank r contributes dF_r = F_r - F0 and dS_r = F_r V_r - F0 V0 (the sum of its new
    entropies); the merged state is F = F0 + sum dF_r, V = (F0 V0 + sum dS_r) / F (Eq. 12). The
    last-visit record (the "w/o OVR" ablation) takes the mean of the ranks that changed it. The same
    all_reduce carries each rank's out-of-range flag (:func:`kcd_fast.ops.check_errors`).
    """
    v0, f0, l0 = synced
    n, device = values.numel(), values.device
    f0d, v0d = f0.double(), v0.double()
    parts = [counts.double() - f0d, counts.double() * values.double() - f0d * v0d]
    if last_values is not None:
        changed = (last_values != l0).double()
        parts += [changed, changed * last_values.double()]
    flag = ops.existing_error_flag(device)
    mine = flag.double() if flag is not None else torch.zeros(1, dtype=torch.float64, device=device)
    packed = torch.cat(parts + [mine])
    dist.all_reduce(packed)
    others = packed[-1] - mine[0]
    d_count, d_sum = packed[:n], packed[n:2 * n]
    f = f0d + d_count
    values.copy_(torch.where(f > 0, (f0d * v0d + d_sum) / f.clamp_min(1.0), v0d).float())
    counts.copy_(f.round().int())
    if last_values is not None:
        hits, total = packed[2 * n:3 * n], packed[3 * n:4 * n]
        last_values.copy_(torch.where(hits > 0, total / hits.clamp_min(1.0), l0.double()).float())
    new_synced = (values.clone(), counts.clone(), None if last_values is None else last_values.clone())
    return new_synced, int(others.item())  # a stage end (or a checkpoint): a sync here is cheap
