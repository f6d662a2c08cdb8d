"""CRD, Contrastive Representation Distillation (Tian, Krishnan and Isola, ICLR 2020), with memory banks.

The paper (Sec. 3.1) bounds the mutual information between the teacher's and the student's
representations T and S with a critic h that tells a pair drawn from the joint (C = 1, one sample
seen by both) from N pairs drawn from the product of marginals (C = 0, noise):

    I(T; S) >= log N + L_critic(h),
    L_critic(h) = E_{q(T,S|C=1)}[log h(T, S)] + N E_{q(T,S|C=0)}[log(1 - h(T, S))],
    h(T, S) = e^{g_T(T)'g_S(S)/tau} / (e^{g_T(T)'g_S(S)/tau} + N/M),

with g_T, g_S linear embeddings to ``crd_feat_dim`` = 128 dimensions, L2-normalised, tau =
``crd_nce_t`` = 0.07 and M the size of the training set. As in the authors' code (RepDistiller's
``crd/``, whose loss comment cites the same objective) the exponentials are divided by a constant
Z instead of the partition function, and both directions are used: the student's embedding v_s[b]
against the teacher bank's rows (its positive, the teacher's embedding of sample b, and K noise
rows), and the teacher's v_t[b] against the student bank's. With s[b, k] = <bank[idx[b, k]], v[b]>,
x = e^{s / tau} / Z, c = K/M + 1e-7 (the noise probability of the K draws, and the code's eps):

    loss = -(1/B) sum_b [ log(x[b, 0] / (x[b, 0] + c)) + sum_{k >= 1} log((K/M) / (x[b, k] + c)) ],
    d loss / d s[b, 0] = -c / (B tau (x[b, 0] + c)),   d loss / d s[b, k >= 1] = x[b, k] / (B tau (x[b, k] + c)),

the sum of the two directions weighted by ``crd_weight`` (beta), plus ``ce_weight_crd`` (gamma) times
the cross-entropy and ``kd_weight_crd`` (alpha) times Hinton's KD at ``kd_temperature``.

Defaults, CIFAR-100 (paper Sec. 4 and RepDistiller's ``train_student.py`` / README): feat_dim 128,
nce_k 16384 negatives, nce_t 0.07, nce_mom 0.5; the README's CRD command is ``-a 0 -b 0.8`` with
``-r`` left at its default 1: gamma = 1 (CE), alpha = 0 (no KD), beta = 0.8. "CRD+KD" is ``-a 1 -b 0.8``
(``kd_weight_crd=1``), with the trainer's KD temperature 4.

Z. CRD sets Z = mean(e^{s / tau}) M once, from the first batch's scores of each direction, with a
``.item()``. Here ``z`` is a device buffer and ``z_set`` a flag buffer: every training step computes
the candidate and keeps ``torch.where(z_set, z, candidate)``, so no step waits for the GPU and the
first step's value stays (it is saved with the state dict). No gradient flows through Z.

Noise. K indices per sample, uniform over all M rows with replacement, drawn on the device with
``torch.randint`` from a generator seeded by :func:`noise_seed` (the ``seed`` option and the rank):
RepDistiller's ``ContrastMemory`` draws so (an alias table of uniform weights) when the loader gives no
indices, as on ImageNet. Its CIFAR loader instead draws the K negatives of a sample among the samples
of the other classes, without replacement; that needs per-class index lists in the dataset, which
this distiller does not read. A noise draw may hit the sample's own row (probability K/M per
sample), as in ``ContrastMemory``. Column 0 is the sample's own dataset index (``batch.index``).

Memory. ``memory_s`` and ``memory_t`` [M, d] float32 buffers, initialised uniform in [-stdv, stdv]
with stdv = 1/sqrt(d/3) (unit expected norm) from a generator seeded by ``seed``. After the loss, under
no_grad, the rows of the batch's indices become normalize(mom old + (1 - mom) v), mom = ``crd_nce_mom``;
an index twice in a batch takes the update of its last occurrence (every duplicate writes that same
row, so the result does not depend on the order of the writes). The loss's gradient with respect to
v is computed in its forward, before that update, so that the backward never reads updated rows.
M is the full training set, also under knowledge condensation (KCD): the bank is indexed by dataset
index, and noise is drawn over all M rows. A point condensed away is no longer visited, so its rows
are never updated again: they keep the embedding of their last visit and stay in the noise. The
momentum bank is already a few epochs stale (each row moves once an epoch); a dropped point's rows
grow staler with every epoch after it is dropped, up to a fraction 1 - rho of the noise by the end
(30% at rho = 0.7). They are still embeddings of real samples, so the noise stays a sample of the
data, only of older student and teacher heads; Pn = 1/M is kept.

DDP. The banks stay identical on every rank: one ``all_gather`` a step (when torch.distributed is
initialised with more than one process) brings every rank's (index, v_s, v_t) and the two row sums
of Z's candidate, and every rank applies the same update in rank order; Z is then that of the
global first batch. Every rank must hold the same number of samples a step (DistributedSampler's
padding gives that). Each rank draws its own noise. The banks need no broadcast: wrap the distiller
in DDP with ``broadcast_buffers=False`` (the default would send both banks from rank 0 every step).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kcd_fast.checks import check_index_range, check_int, check_real, check_temperature
from kcd_fast.distill import kl_distill
from kcd_fast.distillers.base import Batch, Distiller, register_distiller
from kcd_fast.distillers.common import CheckedSettings, cross_entropy, feature_shape

__all__ = ["CRD", "CRDSettings", "ContrastLoss", "Embed", "BANK_BUFFERS", "noise_seed", "init_bank",
           "nce_loss_and_grad", "last_occurrence", "momentum_update_", "all_gather_rows"]

OP = "crd"
EPS = 1e-7  # RepDistiller's eps in the NCE loss
BANK_BUFFERS = ("memory_s", "memory_t")


@dataclasses.dataclass(frozen=True)
class CRDSettings(CheckedSettings):
    """CRD's options (trainer option names), defaults of the paper's CIFAR-100 runs (see the module),
    checked when made: each a one-line error naming the option."""

    crd_feat_dim: int = 128        # d, the embedding dimension
    crd_nce_k: int = 16384         # K, noise samples per sample
    crd_nce_t: float = 0.07        # tau
    crd_nce_mom: float = 0.5       # momentum of the bank update
    crd_weight: float = 0.8        # beta, the contrastive loss's weight
    ce_weight_crd: float = 1.0     # gamma, the cross-entropy's weight
    kd_weight_crd: float = 0.0     # alpha, KD's weight (1 for "CRD+KD")
    kd_temperature: float = 4.0    # KD's temperature, where alpha > 0
    seed: int = 0                  # seeds the banks' initial values and the noise draws

    def __post_init__(self):
        super().__post_init__()  # every field a finite number >= 0
        op = type(self).__name__
        check_int(op, "crd_feat_dim", self.crd_feat_dim, 1)
        check_int(op, "crd_nce_k", self.crd_nce_k, 1)
        check_temperature(op, self.crd_nce_t, "crd_nce_t")
        check_real(op, "crd_nce_mom", self.crd_nce_mom, 0.0, 1.0, hi_open=True)
        check_temperature(op, self.kd_temperature, "kd_temperature")
        check_int(op, "seed", self.seed, 0)


def noise_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The seed of a rank's noise generator in an epoch: distinct per (seed, rank, epoch)."""
    return (int(seed) * 1_000_003 + int(rank) * 7_919 + int(epoch) * 104_729 + 0x43524400) % (2 ** 63)


def init_bank(num_samples: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """CRD's initial bank: float32 [N, d] uniform in [-stdv, stdv], stdv = 1/sqrt(d/3). Under
    ``torch.device("meta")`` (a dry build: shapes only) an empty meta tensor, nothing drawn."""
    if torch.get_default_device().type == "meta":
        return torch.empty(num_samples, dim, device="meta")
    stdv = 1.0 / math.sqrt(dim / 3)
    return torch.rand(num_samples, dim, generator=generator).mul_(2 * stdv).add_(-stdv)


class Embed(nn.Module):
    """g(x) = normalize(W x + b): CRD's embedding head (flattens the input; float32 output)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x.flatten(1).to(self.linear.weight.dtype))
        return F.normalize(h.float(), dim=1)


def nce_loss_and_grad(exp_scores: torch.Tensor, z: torch.Tensor, nce_t: float,
                      num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CRD's NCE loss (the module's formula) from e = exp(s / tau) [B, K+1] (column 0 the positive) and Z,
    and its gradient with respect to the scores s, both float32: (loss, d loss / d s)."""
    batch, k1 = exp_scores.shape
    noise = (k1 - 1) / num_samples   # K Pn, Pn = 1/M
    c = noise + EPS
    x = exp_scores / z
    denom = x + c
    pos = torch.log(x[:, 0] / denom[:, 0]).sum()
    neg = torch.log(noise / denom[:, 1:]).sum()
    loss = -(pos + neg) / batch
    scale = 1.0 / (batch * nce_t)
    grad = x / denom * scale
    grad[:, 0] = -c / denom[:, 0] * scale
    return loss, grad


class ContrastLoss(torch.autograd.Function):
    """One direction of CRD's loss, with d loss / d v computed in the forward (before the bank update):
    forward(v, e, memory, idx, z, nce_t, M, fused) -> scalar loss; backward scales the saved gradient."""

    @staticmethod
    def forward(ctx, v, exp_scores, memory, idx, z, nce_t, num_samples, fused):
        from kcd_fast.kernels import crd_scores as K  # imports triton: only when CRD runs

        loss, g = nce_loss_and_grad(exp_scores, z, nce_t, num_samples)
        if fused:
            grad_v = K.crd_scores_grad_triton(g, memory, idx, out_dtype=torch.float32)
        else:
            grad_v = K.crd_scores_grad_torch(g, memory, idx)
        ctx.save_for_backward(grad_v)
        ctx.v_dtype = v.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad_v,) = ctx.saved_tensors
        return (grad_v * grad_output).to(ctx.v_dtype), None, None, None, None, None, None, None


def last_occurrence(idx: torch.Tensor) -> torch.Tensor:
    """For each position p of ``idx`` [M], the last position q with idx[q] == idx[p] (p itself when it
    does not repeat), on the device, without a host sync: a stable sort, then each run's end."""
    m = idx.numel()
    order = torch.sort(idx, stable=True).indices
    ordered = idx.index_select(0, order)
    pos = torch.arange(m, device=idx.device)
    is_end = torch.ones(m, dtype=torch.bool, device=idx.device)
    is_end[:-1] = ordered[1:] != ordered[:-1]
    end = torch.where(is_end, pos, m)
    end = torch.flip(torch.cummin(torch.flip(end, [0]), 0).values, [0])  # the next run end at or after
    last = torch.empty_like(order)
    last[order] = order.index_select(0, end)
    return last


@torch.no_grad()
def momentum_update_(bank: torch.Tensor, idx: torch.Tensor, v: torch.Tensor, momentum: float) -> None:
    """bank[idx] = normalize(momentum bank[idx] + (1 - momentum) v), in place; a repeated index takes
    its last occurrence's update (all its copies write that row)."""
    rows = bank.index_select(0, idx).float() * momentum + v.float() * (1.0 - momentum)
    rows = F.normalize(rows, dim=1)
    bank.index_copy_(0, idx, rows.index_select(0, last_occurrence(idx)).to(bank.dtype))


def all_gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's rows of each tensor ([B] or [B, n], equal B on every rank), concatenated in rank
    order, in one all_gather (packed as float64: indices below 2^53 stay exact); the tensors
    themselves, unchanged, when torch.distributed is not initialised or has one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    cols = [t.reshape(t.shape[0], -1) for t in tensors]
    packed = torch.cat([c.to(torch.float64) for c in cols], dim=1).contiguous()
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, packed)
    full = torch.cat(parts, dim=0)
    out, start = [], 0
    for t, c in zip(tensors, cols):
        piece = full[:, start:start + c.shape[1]].reshape((full.shape[0],) + tuple(t.shape[1:]))
        out.append(piece.to(t.dtype))
        start += c.shape[1]
    return tuple(out)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@register_distiller("crd")
class CRD(Distiller):
    """CRD on the ``pooled`` taps (the classifiers' inputs) of student and teacher; see the module.

    Parameters: ``embed_s`` and ``embed_t`` (trained with the student). Buffers: ``memory_s``,
    ``memory_t`` (float32 [num_samples, crd_feat_dim]), ``z`` (float32 [2]: Z of the student's and of the
    teacher's direction) and ``z_set`` (bool). ``fused``: None picks the Triton kernels for CUDA banks and
    the eager gather + bmm elsewhere; True / False forces one (True on the CPU needs TRITON_INTERPRET=1).
    """

    student_taps = ("pooled",)
    teacher_taps = ("pooled",)
    Settings = CRDSettings

    def __init__(self, settings, student_shapes, teacher_shapes, *, num_samples: int, num_classes: int):
        settings = CRDSettings() if settings is None else settings
        super().__init__(settings, student_shapes, teacher_shapes, num_samples=num_samples, num_classes=num_classes)
        self.num_samples = check_int(OP, "num_samples", num_samples, 1)
        dim = settings.crd_feat_dim
        self.embed_s = Embed(math.prod(feature_shape(OP, "student", student_shapes, "pooled", 2)), dim)
        self.embed_t = Embed(math.prod(feature_shape(OP, "teacher", teacher_shapes, "pooled", 2)), dim)
        gen = torch.Generator().manual_seed(int(settings.seed))
        self.register_buffer("memory_s", init_bank(self.num_samples, dim, gen))
        self.register_buffer("memory_t", init_bank(self.num_samples, dim, gen))
        self.register_buffer("z", torch.ones(2))
        self.register_buffer("z_set", torch.zeros((), dtype=torch.bool))
        self.fused: bool | None = None
        self._generators: dict[torch.device, tuple[torch.Generator, int]] = {}
        self.noise_epoch = 0  # the epoch of the batch in hand (set by forward): seeds the noise stream

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in BANK_BUFFERS:
            bank = state_dict.get(prefix + name)
            if bank is not None and tuple(bank.shape) != tuple(getattr(self, name).shape):
                raise ValueError(
                    f"{OP}: the state dict's `{name}` is {list(bank.shape)} but this run needs [num_samples, "
                    f"crd_feat_dim] = [{self.num_samples}, {self.settings.crd_feat_dim}]: the bank holds one row per "
                    f"sample of the full training set; load a checkpoint of the same dataset and --crd-feat-dim")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def generator(self, device: torch.device) -> torch.Generator:
        """The noise generator of ``device``, seeded with :func:`noise_seed` (seed, rank, epoch) on first use
        and again whenever ``noise_epoch`` changes: a run resumed at an epoch boundary draws the noise
        an uninterrupted run draws, with no generator state in the checkpoint."""
        device = torch.device(device)
        gen, epoch = self._generators.get(device, (None, None))
        if gen is None:
            gen = torch.Generator(device=device)
        if epoch != self.noise_epoch:
            gen.manual_seed(noise_seed(self.settings.seed, _rank(), self.noise_epoch))
            self._generators[device] = (gen, self.noise_epoch)
        return gen

    def contrast_indices(self, index: torch.Tensor) -> torch.Tensor:
        """int64 [B, K+1]: the batch's dataset indices, then K uniform draws in [0, num_samples) per sample
        (``torch.randint(0, M, (B, K), generator=...)`` on index's device)."""
        batch = index.shape[0]
        noise = torch.randint(0, self.num_samples, (batch, self.settings.crd_nce_k), device=index.device,
                              generator=self.generator(index.device))
        return torch.cat([index.reshape(batch, 1).long(), noise], dim=1)

    def use_fused(self) -> bool:
        return self.memory_s.is_cuda if self.fused is None else bool(self.fused)

    def forward(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.settings
        check_index_range(OP, "batch.index", batch.index, self.num_samples)
        self.noise_epoch = int(batch.epoch)
        v_s = self.embed_s(student["pooled"])
        v_t = self.embed_t(teacher["pooled"].detach())
        crd, z = self.contrast(v_s, v_t, batch.index)
        ce = cross_entropy(student["logits"], batch.target)
        terms = {"ce": s.ce_weight_crd * ce, "crd": s.crd_weight * crd}
        if s.kd_weight_crd:
            terms["kd"] = s.kd_weight_crd * kl_distill(student["logits"], teacher["logits"].detach(), s.kd_temperature)
        loss = sum(terms.values())
        # The logs are the loss's weighted terms, as every distiller's (Z is in the state dict).
        return loss, {key: term.detach() for key, term in terms.items()}

    def contrast(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two directions' NCE loss (unweighted sum) of the embeddings v_s, v_t [B, d] of the samples
        ``index`` [B], and Z [2]; in training, sets Z on the first step and updates the banks."""
        from kcd_fast.kernels import crd_scores as K  # imports triton: only when CRD runs

        s, fused = self.settings, self.use_fused()
        idx = self.contrast_indices(index)
        with torch.no_grad():
            # CRD's out_v1 (student anchor, teacher bank) and out_v2 (teacher anchor, student bank).
            e_s = torch.exp(K.crd_scores(v_s.detach(), self.memory_t, idx, fused=fused) / s.crd_nce_t)
            e_t = torch.exp(K.crd_scores(v_t.detach(), self.memory_s, idx, fused=fused) / s.crd_nce_t)
            g_index, g_sum_s, g_sum_t, g_v_s, g_v_t = all_gather_rows(
                index.long(), e_s.sum(1, dtype=torch.float64), e_t.sum(1, dtype=torch.float64), v_s.detach(),
                v_t.detach())
            count = g_sum_s.shape[0] * idx.shape[1]
            candidate = (torch.stack([g_sum_s.sum(), g_sum_t.sum()]) * (self.num_samples / count)).float()
            z = torch.where(self.z_set, self.z, candidate)
        loss = (ContrastLoss.apply(v_s, e_s, self.memory_t, idx, z[0], s.crd_nce_t, self.num_samples, fused)
                + ContrastLoss.apply(v_t, e_t, self.memory_s, idx, z[1], s.crd_nce_t, self.num_samples, fused))
        if self.training:
            with torch.no_grad():
                self.z.copy_(z)
                self.z_set.fill_(True)
                momentum_update_(self.memory_s, g_index, g_v_s, s.crd_nce_mom)
                momentum_update_(self.memory_t, g_index, g_v_t, s.crd_nce_mom)
        return loss, z
