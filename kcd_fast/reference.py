"""Float64 reference implementation of the KCD equations (Li et al., ECCV 2022).

Plain, readable PyTorch, one function per equation. It is the oracle for the
tests and the specification for the fast paths in :mod:`kcd_fast.ops`; it is
deliberately slow (Python loops where the paper describes a sequence).

Conventions used throughout kcd_fast:

* ``values`` is V^F(x), the running mean of the student's prediction entropy
  (Eq. 12); ``counts`` is F(x), how often x was recorded.
* Ranking positions R are 0-based: R = 0 is the most valuable point.
* ``tau`` is the kept *fraction* at a stage. Eq. 8 read literally
  (y = 1 iff 1 - R/N >= tau) would keep the top 1 - tau, which contradicts the
  paper's own |K^| = |K| tau^t, its cost C (Eq. 16) and the official code; we
  follow the latter three: y = 1 for the ``num_kept(N, tau)`` = floor(tau N)
  highest-ranked points, i.e. iff R < floor(tau N).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "entropy",
    "record_values",
    "score",
    "rank",
    "rank_likelihood",
    "tau",
    "num_kept",
    "kept_count",
    "relative_cost",
    "Partition",
    "partition",
    "vaks_eps",
    "vaks_mix",
    "soft_labels",
    "kd_loss",
    "topk_encode",
    "topk_decode",
    "vaks_mix_topk",
]


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Prediction entropy V(x) = -sum_c p_S(x,c) log p_S(x,c) (Eq. 7).

    ``p_S = softmax(logits / temperature)``, in float64. A row with any
    non-finite logit has no defined entropy and yields NaN.
    Returns float64 [B].
    """
    z = logits.detach().to(torch.float64) / float(temperature)
    logp = torch.log_softmax(z, dim=1)
    h = -(logp.exp() * logp).sum(dim=1)
    finite = torch.isfinite(z).all(dim=1)
    return torch.where(finite, h, torch.full_like(h, float("nan")))


def record_values(values: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor,
                  entropies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Online value recording (Eq. 12), one visit at a time, in batch order.

    For each visit of x with entropy V(x): F(x) += 1, then
    V^F(x) = (F - 1)/F * V^{F-1}(x) + V(x)/F.
    Duplicate indices in one batch are successive visits. A NaN entropy (a
    row with non-finite logits) is not a visit: value and count stay.
    Returns new (values float64 [N], counts int64 [N]); inputs are untouched.
    """
    v = values.detach().to(torch.float64).cpu().clone()
    f = counts.detach().to(torch.int64).cpu().clone()
    for i, e in zip(indices.tolist(), entropies.detach().to(torch.float64).cpu().tolist()):
        if math.isnan(e):
            continue
        f[i] += 1
        n = float(f[i])
        v[i] = (n - 1.0) / n * v[i] + e / n
    return v, f


def score(values: torch.Tensor, counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Cost-aware value V^F(x) * F(x)^alpha (Eq. 13), float64 [N].

    With alpha = 0 the score is V (0^0 = 1); a never-seen point (F = 0) with
    alpha > 0 scores 0.
    """
    v = values.detach().to(torch.float64).cpu()
    f = counts.detach().to(torch.float64).cpu()
    return v * f.pow(float(alpha))


def ranking_keys(values: torch.Tensor, counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """The keys ranked by Eq. 13: the float64 score rounded to float32.

    float32 is the precision ``values`` are stored in; scores equal at that
    precision are ties (broken by index, see :func:`rank`). NaN ranks last.
    """
    k = score(values, counts, alpha).to(torch.float32)
    return torch.where(torch.isnan(k), torch.full_like(k, -math.inf), k)


def rank(values: torch.Tensor, counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """R_V = argsort of V^F * F^alpha, descending (Eq. 13); ties by lower index.

    Returns ``order`` int64 [N]: ``order[r]`` is the point at position r.
    """
    keys = ranking_keys(values, counts, alpha)
    n = keys.numel()
    # Sort by (-key, index): a stable sort on the negated keys keeps index order in ties.
    neg = -keys.to(torch.float64) + 0.0  # + 0.0 maps -0.0 to 0.0
    return torch.sort(neg, stable=True).indices.to(torch.int64).reshape(n)


def rank_likelihood(order: torch.Tensor) -> torch.Tensor:
    """p_R(y; x) = 1 - R_V(x) / |X| (Eq. 8), float64 [N], indexed by point."""
    n = order.numel()
    p = torch.empty(n, dtype=torch.float64)
    p[order.cpu()] = 1.0 - torch.arange(n, dtype=torch.float64) / n
    return p


def tau(stage: int, rho: float, num_stages: int, schedule: str = "exp") -> float:
    """Condensation threshold tau^t at stage t = 0, 1, ... (Sec. 3.5, Sec. 4).

    ``"exp"``: tau^t = rho^((t+1)/S), S = I/T stages; tau^0 = 0.9423 and
    tau^{S-1} = rho for rho = 0.7, S = 6.
    ``"linear"``: tau^t = 1 - (t+1)(1-rho)/S, and exactly rho from the last stage t = S-1 on
    (a linear decay; the official code's own steps, a fixed drop of int(N (1-rho) / 6) points,
    are :func:`kcd_fast.official.kept_count`).
    """
    if schedule == "exp":
        return float(rho) ** ((stage + 1) / num_stages)
    if schedule == "linear":
        if stage + 1 >= num_stages:
            return float(rho)
        return 1.0 - (stage + 1) * (1.0 - float(rho)) / num_stages
    raise ValueError(f"schedule must be 'exp' or 'linear', got {schedule!r}")


def num_kept(n: int, stage: int, rho: float, num_stages: int, schedule: str = "exp") -> int:
    """|K1| at stage t: the number of points with y = 1 (Eq. 8 with tau^t), floor(tau^t N).

    Both schedules reach floor(rho N) at the last stage. For ``"linear"`` this equals integer
    steps N - (t+1) floor((1-rho) N / S) whenever (1-rho) N / S is a whole number; otherwise it
    rounds the cumulative decay instead of each step, so a small N still shrinks (and ends at
    floor(rho N)) instead of keeping every point.
    """
    return kept_count(tau(stage, rho, num_stages, schedule), n)


def kept_count(fraction: float, n: int) -> int:
    """floor(fraction * n), the points a kept fraction of n keeps (Eq. 8).

    The product is computed in float64, so it can land just below a whole number
    (0.29 * 10**8 = 28999999.999999996): a slack of 1e-9, relative above 1000
    (1e-12 x), keeps floor() from losing that point at any N.
    """
    x = float(fraction) * n
    return int(math.floor(x + max(1e-9, 1e-12 * x)))


def relative_cost(taus: list[float], stage_epochs: int, epochs: int) -> float:
    """Relative cost C = |K| (tau^0 + ... ) T / (|K| I) (Eq. 16)."""
    return sum(taus) * stage_epochs / epochs


@dataclass
class Partition:
    """Knowledge partition (Sec. 3.4), each index tensor ordered most valuable first."""

    keep: torch.Tensor  # bool [N], y = 1
    k1h: torch.Tensor   # int64, kept and not augmented
    k1l: torch.Tensor   # int64 [L], the lowest-ranked kept points, augmented
    k0: torch.Tensor    # int64 [L], their partners from K0
    num_k0: int         # |K0| before pairing


def partition(order: torch.Tensor, n_keep: int, previous_keep: torch.Tensor | None = None,
              k0: str = "dropped") -> Partition:
    """Split K into K1 (y = 1) and K0, then K1 into K1H and K1L (Sec. 3.4).

    K1 is the top ``n_keep`` of ``order``. K0 is, by policy:

    * ``"dropped"``: points kept before (``previous_keep``, all points if None) and
      not kept now;
    * ``"all"`` (paper text): every point with y = 0;
    * ``"window"`` (the official code): the rank positions [n_keep, |previous_keep|),
      kept before or not.

    |K1L| = min(|K0|, |K1|): K1L is that many of the lowest-ranked kept points,
    paired in rank order with the most valuable points of K0 (Eq. 14).
    """
    order = order.cpu().to(torch.int64)
    n = order.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    k1 = order[:n_keep]
    keep[k1] = True
    rest = order[n_keep:]
    if k0 == "dropped":
        prev = torch.ones(n, dtype=torch.bool) if previous_keep is None else previous_keep.cpu().bool()
        k0_set = rest[prev[rest]]
    elif k0 == "all":
        k0_set = rest
    elif k0 == "window":
        previous = n if previous_keep is None else int(previous_keep.sum())
        k0_set = rest[: max(previous - n_keep, 0)]
    else:
        raise ValueError(f"k0 must be 'dropped', 'all' or 'window', got {k0!r}")
    pairs = min(k0_set.numel(), n_keep)
    k1l = k1[n_keep - pairs:]
    k1h = k1[: n_keep - pairs]
    return Partition(keep=keep, k1h=k1h, k1l=k1l, k0=k0_set[:pairs], num_k0=int(k0_set.numel()))


def vaks_eps(num_pairs: int, eps_max: float, adaptive: bool = True) -> torch.Tensor:
    """Perturbation ratio eps (Eq. 15) for the K1L points, most valuable first.

    With 0-based rank positions x' in K1 and |K1L| = |K0| = L,
    eps(x') = eps_m / L (x' - |K1|) + eps_m = eps_m j / L for the j-th K1L
    point: it rises linearly from 0 to eps_m (exclusive), as in the official
    code (which computes it in float32: :func:`kcd_fast.official.pair_eps`, within 6e-8 of this).
    ``adaptive=False`` is the ablation with eps = eps_m for all pairs.
    Returns float64 [L].
    """
    if not adaptive:
        return torch.full((num_pairs,), float(eps_max), dtype=torch.float64)
    return float(eps_max) * torch.arange(num_pairs, dtype=torch.float64) / max(num_pairs, 1)


def vaks_mix(buffer: torch.Tensor, dst: torch.Tensor, src: torch.Tensor,
             eps: torch.Tensor) -> torch.Tensor:
    """Knowledge augmentation K_Aug = K1L (+) K0 (x) eps (Eq. 14), out of place.

    Row-wise ``out[dst] = (1 - eps) * buffer[dst] + eps * buffer[src]`` in
    float64, one pair at a time. The mix is convex, so probability rows stay
    normalised. Integer buffers are rounded to nearest (ties to even) and
    clamped to their range. Returns a new tensor of ``buffer``'s dtype.
    """
    out = buffer.detach().cpu().clone()
    work = out.to(torch.float64)
    for d, s, e in zip(dst.tolist(), src.tolist(), eps.to(torch.float64).tolist()):
        work[d] = (1.0 - e) * work[d] + e * work[s]
    if not buffer.dtype.is_floating_point:
        info = torch.iinfo(buffer.dtype)
        work = work.round().clamp(info.min, info.max)
    return work.to(buffer.dtype)


# --------------------------------------------------------------------------- cached knowledge (soft labels)


def soft_labels(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """p_T(x) = softmax(teacher logits / T), the knowledge of a point (Sec. 3.1), float64 [B, C]."""
    return torch.softmax(teacher_logits.detach().to(torch.float64) / float(temperature), dim=1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 1's distillation term: T^2 KL(p_T || p_S) at temperature T, averaged over the batch, in
    float64, with ``F.kl_div``'s terms xlogy(p, p) - p log q per class (a class the teacher gives no
    probability adds 0, unless the student's is 0 too: 0 * -inf). Differentiable in the student's
    logits (a float64 leaf gives the reference gradient)."""
    t = float(temperature)
    log_q = torch.log_softmax(student_logits.to(torch.float64) / t, dim=1)
    p = soft_labels(teacher_logits, t)
    terms = torch.xlogy(p, p) - p * log_q
    return terms.sum() / max(student_logits.shape[0], 1) * t * t


def vanilla_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                    temperature: float, ce_weight: float, kd_weight: float) -> torch.Tensor:
    """The M-step loss of vanilla KD (Eq. 1 with the CE term of the paper's CIFAR setup), in float64:
    ce_weight * CE(student, target) + kd_weight * :func:`kd_loss`, both averaged over the batch."""
    s = student_logits.to(torch.float64)
    ce = -torch.log_softmax(s, dim=1).gather(1, target.long().view(-1, 1)).sum() / max(s.shape[0], 1)
    return ce_weight * ce + kd_weight * kd_loss(s, teacher_logits, temperature)


def stored_teacher_logits(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits T log max(p, 1e-20) that give the stored soft labels p back at temperature T (float64):
    how a knowledge buffer's rows enter a logit loss."""
    return float(temperature) * torch.log(probs.detach().to(torch.float64).clamp_min(1e-20))


def topk_encode(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest probabilities of each row and their classes, ties to the lower class id.

    Returns (values float64 [B, k], classes int64 [B, k]), largest first. The rest of the mass,
    1 - sum(values), is what :func:`topk_decode` spreads uniformly over the other C - k classes.
    """
    p = probs.detach().to(torch.float64)
    order = torch.sort(-p, dim=1, stable=True).indices[:, :k]
    return torch.gather(p, 1, order), order


def topk_decode(values: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dense rows from top-k storage: the stored classes, and 1 - sum spread over the others."""
    v = values.detach().to(torch.float64)
    k = v.shape[1]
    rest = (1.0 - v.sum(dim=1, keepdim=True)).clamp_min(0.0)
    uniform = rest / max(num_classes - k, 1) if num_classes > k else torch.zeros_like(rest)
    out = uniform.expand(v.shape[0], num_classes).clone()
    out.scatter_(1, classes.long(), v)
    return out


def vaks_mix_topk(values: torch.Tensor, classes: torch.Tensor, dst: torch.Tensor, src: torch.Tensor,
                  eps: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 14 on top-k soft labels: mix the two decoded rows, then keep the top k again.

    Row ``dst`` becomes topk_encode((1 - eps) decode(dst) + eps decode(src)); the truncated mass
    returns to the uniform remainder. Returns new (values float64, classes int64).
    """
    v = values.detach().to(torch.float64).clone()
    c = classes.detach().to(torch.int64).clone()
    k = v.shape[1]
    for d, s, e in zip(dst.tolist(), src.tolist(), eps.to(torch.float64).tolist()):
        dense = topk_decode(v[[d, s]], c[[d, s]], num_classes)
        mixed = (1.0 - e) * dense[0:1] + e * dense[1:2]
        nv, nc = topk_encode(mixed, k)
        v[d], c[d] = nv[0], nc[0]
    return v, c
