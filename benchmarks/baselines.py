"""The alternatives kcd_fast is measured against, written fresh from their descriptions.

* ``eager``: what a user writes in plain PyTorch, without a host sync.
* ``official``: the official KCD code's approach (github dzy3/KCD): a per-epoch
  numpy entropy array written through ``.cpu()`` every step, an [N, epochs]
  float64 record grown by one column per epoch, a numpy E-step over it, and
  mixing one pair at a time in a Python loop.

They are used by the benchmarks and checked against kcd_fast in
tests/test_baselines.py, so every ratio compares equal work.
"""
from __future__ import annotations

import numpy as np
import torch


# --------------------------------------------------------------------------- per-step recording


def eager_update_values(values, counts, indices, logits, temperature=1.0):
    """Eq. 7 + Eq. 12 in eager PyTorch: softmax entropy, then a duplicate-safe scatter."""
    with torch.no_grad():
        p = torch.softmax(logits.float() / temperature, dim=1)
        ent = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=1)
        idx = indices.long()
        counts.index_add_(0, idx, torch.ones_like(idx, dtype=counts.dtype))
        step = (ent - values[idx]) / counts[idx].float()
        values.index_add_(0, idx, step)
    return ent


class OfficialRecorder:
    """The official code's recording: ``_entropy[index] = entropy.cpu()`` every step (a host sync),
    and at the end of each epoch ``np.concatenate`` of that column onto the [N, epochs] record."""

    def __init__(self, num_samples: int):
        self.epoch_entropy = -np.ones(num_samples)
        self.record = None

    def observe(self, indices, logits):
        with torch.no_grad():
            probs = torch.softmax(logits.float(), dim=1)
            entropy = -torch.sum(probs * torch.log(probs), dim=1)
            self.epoch_entropy[indices.cpu().numpy()] = entropy.cpu().numpy()

    def end_epoch(self):
        col = self.epoch_entropy.reshape(-1, 1)
        self.record = col if self.record is None else np.concatenate((self.record, col), axis=1)
        self.epoch_entropy = -np.ones(len(self.epoch_entropy))


def official_record(values: torch.Tensor, counts: torch.Tensor, epochs: int) -> np.ndarray:
    """The official [N, epochs] float64 record that holds the same V and F as (values, counts):
    F(x) epochs with entropy V(x), the others -1 (not seen), as the official code writes them."""
    v = values.double().cpu().numpy()
    f = counts.cpu().numpy()
    record = -np.ones((len(v), epochs))
    seen = np.arange(epochs)[None, :] < f[:, None]
    record[seen] = np.repeat(v, np.minimum(f, epochs))
    return record


def official_estep(record: np.ndarray, n_keep: int, prev_len: int, stage_epochs: int = 40, alpha: float = 0.03):
    """The official E-step (update_dataset_mul_entropy_V3) over the float64 [N, epochs] record.

    Mean of the positive entries times (count / T)^alpha, argsort descending,
    keep the top n_keep, the next ones down to prev_len as the lost points,
    and as many of the lowest kept points to mix.
    """
    ent = np.clip(record, 0.0, a_max=record.max())
    total = np.sum(ent, axis=1)
    seen = np.sum(np.where(record > 0.0, 1.0, 0.0), axis=1)
    cost = np.power(np.true_divide(seen, float(stage_epochs)), alpha)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = cost * np.true_divide(total, seen)
    order = scores.argsort()[::-1]
    remain = order[:n_keep]
    lost = order[n_keep:prev_len]
    mix_remain = remain[len(remain) - len(lost):]
    return remain, lost, mix_remain


# --------------------------------------------------------------------------- E-step in eager PyTorch


def eager_condense(values, counts, n_keep, alpha, eps_max, previous_keep):
    """Score, argsort, keep mask, K0 = dropped, K1L and eps in eager PyTorch."""
    score = values.double() * counts.double().pow(alpha)
    order = torch.argsort(score, descending=True, stable=True)
    keep = torch.zeros_like(previous_keep)
    keep[order[:n_keep]] = True
    rest = order[n_keep:]
    k0 = rest[previous_keep[rest]]
    pairs = min(k0.numel(), n_keep)
    k1l = order[n_keep - pairs:n_keep]
    eps = eps_max * torch.arange(pairs, device=values.device, dtype=torch.float64) / max(pairs, 1)
    return keep, k1l, k0[:pairs], eps.float()


# --------------------------------------------------------------------------- VAKS mixing


def eager_vaks_mix_(buffer, dst, src, eps):
    """Gather both rows, mix in fp32, scatter back: three kernels and two temporaries."""
    shape = (-1,) + (1,) * (buffer.dim() - 1)
    w = eps.float().view(shape)
    mixed = (1.0 - w) * buffer[dst].float() + w * buffer[src].float()
    if buffer.dtype == torch.uint8:
        mixed = mixed.round_().clamp_(0, 255)
    buffer[dst] = mixed.to(buffer.dtype)
    return buffer


def official_vaks_mix_(buffer, dst, src, eps):
    """One pair at a time in a Python loop, as the official MIXUPNet does: float32, and uint8 rows
    truncated toward zero (its ``torch.tensor(m, dtype=torch.uint8)``), not rounded."""
    for d, s, e in zip(dst.tolist(), src.tolist(), eps.tolist()):
        row = (1.0 - e) * buffer[d].float() + e * buffer[s].float()
        buffer[d] = row.to(buffer.dtype)  # float -> uint8 truncates
    return buffer
