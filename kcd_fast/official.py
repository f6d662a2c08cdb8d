"""The official KCD code's selection (github.com/dzy3/KCD), as ``protocol="official"`` runs it.

What differs from the paper's reading (``protocol="paper"``; docs/paper-notes.md has the table):

* **Record.** One entropy per sample per epoch (the last visit's; a sampler without replacement
  visits each kept sample once), V = the mean of the positive entries over every epoch so far, in
  float64, F = their number. An entropy of exactly 0 is not counted.
* **Score and rank.** (F / 40)^alpha V in float64 (40 is the official constant; it scales every
  score alike), ranked descending. Exact ties go in the order of a stable ascending sort reversed
  (the higher index first); the official ``argsort()[::-1]`` uses numpy's unstable sort, whose
  order of exact ties depends on the numpy version.
* **When.** After every 1-based epoch that is a multiple of T, the last epoch included (the set
  that condensation makes is never trained on).
* **How many.** Each condensation drops int(N (1 - rho) / 6) points (six stages, whatever I / T
  is), never below int(rho N).
* **Pairs.** K0 is the window of rank positions [new count, previous count); K1L the as many
  lowest-ranked kept points; pair j joins the j-th of each (:func:`kcd_fast.ops.condense` with
  ``k0="window"``). eps_j = 1 - (eps_m (L - j) / L + 1 - eps_m), in float32 (:func:`pair_eps`).
* **Mixing.** Pixels (uint8) in place, in float32, truncated to uint8 (:func:`mix_pixels_`); the
  mixes compound across stages.

Where the official code fails, ``protocol="official"`` does the evident correct thing and warns
once: an empty K0 window (the count already at its floor) makes no pairs, where the official code
raises IndexError; a non-finite entropy is not recorded, where one NaN turns every official score
NaN (through ``np.clip(a_max=record.max())``).
"""
from __future__ import annotations

import warnings

import torch

from kcd_fast.checks import check_int, check_real, check_tensor

__all__ = ["kept_count", "pair_eps", "mix_pixels_", "fold_epoch_", "scores", "ranking", "COST_SCALE"]

STAGES = 6          # the official drop size assumes six condensations
COST_SCALE = 40.0   # the official score's (F / 40) ** alpha


def kept_count(num_samples: int, rho: float, previous: int) -> int:
    """The kept count after a condensation that starts from ``previous`` kept points:
    max(previous - int(N (1 - rho) / 6), int(rho N)), in the official code's float64 arithmetic."""
    drop = int(num_samples * (1 - rho) / STAGES)
    return max(previous - drop, int(rho * num_samples))


def pair_eps(num_pairs: int, eps_max: float = 0.3) -> torch.Tensor:
    """eps of the pairs j = 0 .. L-1, float32 as the official code computes it:
    r_j = eps_m (L - j) / L + (1 - eps_m), eps_j = 1 - r_j (0 for j = 0, below eps_m for all j)."""
    num_pairs = check_int("pair_eps", "num_pairs", num_pairs, 0)
    eps_max = check_real("pair_eps", "eps_max", eps_max, lo=0.0, hi=1.0)
    if num_pairs == 0:
        return torch.zeros(0, dtype=torch.float32)
    share = (float(num_pairs) * torch.ones(num_pairs) - torch.arange(num_pairs)) / num_pairs
    keep_ratio = eps_max * share + (1 - eps_max)  # float32 tensors with Python scalars: float32 throughout
    return 1 - keep_ratio


def mix_pixels_(images: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``images[dst] = trunc(f32(images[dst] (1 - eps)) + f32(images[src] eps))``, in place, as the
    official code mixes its CIFAR pixels: both sides read before any write, float32 products and
    sum, the result truncated toward zero to uint8. Returns ``images`` (uint8 [N, ...])."""
    op = "mix_pixels_"
    check_tensor(op, "images", images, (torch.uint8,))
    check_tensor(op, "dst", dst, (torch.int64,), 1)
    check_tensor(op, "src", src, (torch.int64,), 1, shape=tuple(dst.shape))
    check_tensor(op, "eps", eps, (torch.float32,), 1, shape=tuple(dst.shape))
    if not dst.numel():
        return images
    shape = (-1,) + (1,) * (images.dim() - 1)
    e = eps.to(images.device).view(shape)
    a, b = images[dst.to(images.device)].float(), images[src.to(images.device)].float()
    images[dst.to(images.device)] = (a * (1 - e) + b * e).to(torch.uint8)  # float -> uint8 truncates
    return images


def fold_epoch_(record_sum: torch.Tensor, record_count: torch.Tensor, epoch_entropy: torch.Tensor) -> bool:
    """Add an epoch's entropies (one per sample; -1 where a sample was not trained) to the record:
    the sum of the positive entries (float64) and their count. Resets ``epoch_entropy`` to -1.
    Returns whether a non-finite entropy was left out (the caller warns once)."""
    finite = torch.isfinite(epoch_entropy)
    positive = finite & (epoch_entropy > 0)
    record_sum.add_(torch.where(positive, epoch_entropy.double(), 0.0))
    record_count.add_(positive.int())
    skipped = bool((~finite).any())  # once an epoch: a sync here is cheap
    epoch_entropy.fill_(-1.0)
    return skipped


def scores(record_sum: torch.Tensor, record_count: torch.Tensor, alpha: float) -> torch.Tensor:
    """(F / 40)^alpha V in float64, V = the record's mean; 0 for a point with no positive entry
    (the official code's 0 / 0 gives NaN, which its ranking puts first)."""
    f = record_count.double()
    value = torch.where(f > 0, record_sum / f.clamp_min(1.0), 0.0)
    return (f / COST_SCALE) ** alpha * value


def ranking(score: torch.Tensor) -> torch.Tensor:
    """Indices by descending score; exact ties with the higher index first (a stable ascending sort,
    reversed)."""
    return torch.sort(score, stable=True).indices.flip(0)


def warn_once(what: str) -> None:
    """A departure from the official code's behaviour where it fails, said once per process."""
    warnings.warn(f"protocol='official': {what}", RuntimeWarning, stacklevel=3)
