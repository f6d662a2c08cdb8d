"""Self-supervised knowledge distillation (Xu, Liu, Li & Loy, ECCV 2020, "Knowledge Distillation Meets
Self-Supervision").

Each image x_b is seen in four views, rotated by 0, 90, 180 and 270 degrees; both networks run on
all 4B views, row 4b + k holding x_b rotated k times (the layout of the authors' loader). A
projection head (Linear, ReLU, Linear, at the penultimate width) on each network's ``pooled``
feature gives the representations of the self-supervision task, contrastive prediction: for each
transformed view (k > 0), which of the batch's B normal views (k = 0) it comes from, scored by the
cosine similarities A[i, j] = cos(h(aug_i), h(nor_j)), a [3B, B] matrix.

Training has two phases:

1. The teacher's head alone learns the task on the frozen teacher's features: the cross-entropy of
   A (as logits, no temperature) with the true sources, ``sskd_head_epochs`` epochs of SGD at
   ``sskd_head_lr``, divided by 10 at 1/2 and 3/4 of them (the authors' 60 epochs, 0.05, [30, 45]).
2. The student (and its own head) learns from four terms:
   ``ce_weight_sskd`` CE(normal views, labels)
   + ``kd_weight_sskd`` KD(normal views, T = ``kd_temperature``)
   + ``sskd_tf_weight`` KD(transformed views, T = ``sskd_tf_temperature``) over the kept rows
   + ``sskd_ss_weight`` KL(softmax(A_T / T_ss) || softmax(A_S / T_ss)) T_ss^2 over the kept rows,
   T_ss = ``sskd_ss_temperature``, each KL the mean over its rows ("batchmean").

The kept rows come from the paper's error-level ranking of the teacher's mistakes: a row is right
when the teacher ranks its true answer (the label; the source image for A) first. Every right row is
kept, and of the wrong ones the fraction ``sskd_tf_ratio`` / ``sskd_ss_ratio`` whose true answer
the teacher ranks highest (the authors keep floor(ratio x wrong) of them, the best ranked first).
Here the rank of the true answer is the number of scores strictly above it, and rows of equal rank
keep their row order, so the selection is deterministic (the authors' ``argsort`` leaves ties in
either order); the selection and the means stay on the device, with no host read.

With KCD, the condenser records the student's logits of the normal views only
(:meth:`SSKD.observed_rows`), and VAKS mixes the inputs before they are rotated (the loader mixes,
:meth:`SSKD.views` rotates the mixed batch).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from kcd_fast.checks import check_int, check_real, check_temperature
from kcd_fast.distillers.base import Distiller, register_distiller
from kcd_fast.distillers.common import CheckedSettings, cross_entropy, feature_shape, upcast

__all__ = ["SSKDSettings", "ProjectionHead", "rotated_views", "split_views", "view_similarity", "target_rank",
           "error_level_keep", "masked_kl", "head_loss", "sskd_terms", "SSKD"]

VIEWS = 4  # the rotations by 0, 90, 180 and 270 degrees
COSINE_EPS = 1e-8  # F.cosine_similarity's


@dataclasses.dataclass(frozen=True)
class SSKDSettings(CheckedSettings):
    """SSKD's options; defaults: the authors' ``student.py`` (the same on every dataset)."""

    ce_weight_sskd: float = 0.1
    kd_weight_sskd: float = 0.9
    sskd_tf_weight: float = 2.7
    sskd_ss_weight: float = 10.0
    kd_temperature: float = 4.0       # the normal views' KD (shared with the trainer's --kd-temperature)
    sskd_tf_temperature: float = 4.0  # the transformed views' KD
    sskd_ss_temperature: float = 0.5  # the similarity matrices' softmax
    sskd_tf_ratio: float = 1.0        # the fraction of the teacher's wrong transformed rows kept
    sskd_ss_ratio: float = 0.75       # the fraction of its wrong similarity rows kept
    sskd_head_epochs: int = 60        # the teacher head's training, before the student's
    sskd_head_lr: float = 0.05

    def __post_init__(self):
        super().__post_init__()  # every field a finite number >= 0
        op = type(self).__name__
        for name in ("kd_temperature", "sskd_tf_temperature", "sskd_ss_temperature"):
            check_temperature(op, getattr(self, name), name)
        for name in ("sskd_tf_ratio", "sskd_ss_ratio"):
            check_real(op, name, getattr(self, name), 0.0, 1.0)
        check_int(op, "sskd_head_epochs", self.sskd_head_epochs, 0)
        check_real(op, "sskd_head_lr", self.sskd_head_lr, lo=0.0, lo_open=True)


class ProjectionHead(nn.Module):
    """Linear, ReLU, Linear at the feature's width: the self-supervision task's head."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1).to(self.net[0].weight.dtype))


def rotated_views(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, H] -> [4B, C, H, H]: row 4b + k is image b rotated k times by 90 degrees."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        got = f"{tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"sskd: rotating the inputs by 90 degrees needs square image batches [B, C, H, H], "
                         f"got {got}")
    return torch.stack([torch.rot90(x, k, dims=(2, 3)) for k in range(VIEWS)], dim=1).flatten(0, 1)


def split_views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the 4B views -> (the B normal rows, the 3B transformed rows: image b's at 3b..3b+2)."""
    grouped = t.reshape(-1, VIEWS, *t.shape[1:])
    return grouped[:, 0], grouped[:, 1:].flatten(0, 1)


def view_similarity(representations: torch.Tensor) -> torch.Tensor:
    """[4B, D] -> [3B, B]: the cosine similarity of each transformed view's representation with each
    normal view's (F.cosine_similarity's eps on each norm)."""
    nor, aug = split_views(upcast(representations))
    nor = nor / nor.norm(dim=1, keepdim=True).clamp_min(COSINE_EPS)
    aug = aug / aug.norm(dim=1, keepdim=True).clamp_min(COSINE_EPS)
    return aug @ nor.t()


def source_index(batch: int, device) -> torch.Tensor:
    """[3B]: the normal view each transformed row comes from (b for rows 3b..3b+2)."""
    return torch.arange(batch, device=device).repeat_interleave(VIEWS - 1)


def target_rank(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[R, K] scores, [R] true columns -> [R] int64: how many scores of the row exceed the true one's
    (0: the row ranks its true answer first)."""
    true = scores.gather(1, target.view(-1, 1))
    return (scores > true).sum(dim=1)


def error_level_keep(rank: torch.Tensor, ratio: float) -> torch.Tensor:
    """[R] ranks -> [R] bool: every row of rank 0, and the floor(ratio x wrong) best-ranked of the
    ``wrong`` rows of rank > 0 (equal ranks in row order). On the device, without a host read."""
    wrong = (rank > 0).sum()
    keep = (rank.numel() - wrong) + torch.floor(wrong.double() * ratio).long()
    order = torch.sort(rank, stable=True).indices
    position = torch.empty_like(order)
    position[order] = torch.arange(rank.numel(), device=rank.device)
    return position < keep


def masked_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, keep: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) T^2, the mean over the rows ``keep`` selects
    (0 when it selects none)."""
    log_p_s = F.log_softmax(upcast(student) / temperature, dim=1)
    p_t = F.softmax(upcast(teacher) / temperature, dim=1)
    rows = F.kl_div(log_p_s, p_t, reduction="none").sum(dim=1)
    kept = keep.to(rows.dtype)
    return (rows * kept).sum() / kept.sum().clamp_min(1.0) * temperature ** 2


def head_loss(representations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The self-supervision task of the teacher head's phase on its [4B, D] representations:
    (cross-entropy of the similarities with the sources, the fraction of rows ranked right)."""
    similarity = view_similarity(representations)
    source = source_index(similarity.shape[1], similarity.device)
    right = (similarity.argmax(dim=1) == source).to(similarity.dtype).mean()
    return F.cross_entropy(similarity, source), right


def sskd_terms(s_logits, t_logits, s_repr, t_repr, target, settings: SSKDSettings) -> dict[str, torch.Tensor]:
    """The four weighted terms of the student's loss (see the module), from both networks' logits and
    head representations of the 4B views and the B labels."""
    cfg = settings
    s_nor, s_aug = split_views(s_logits)
    t_nor, t_aug = split_views(t_logits.detach())
    aug_target = target.repeat_interleave(VIEWS - 1)
    keep_tf = error_level_keep(target_rank(t_aug, aug_target), cfg.sskd_tf_ratio)
    s_sim, t_sim = view_similarity(s_repr), view_similarity(t_repr.detach())
    keep_ss = error_level_keep(target_rank(t_sim, source_index(t_sim.shape[1], t_sim.device)), cfg.sskd_ss_ratio)
    return {"ce": cfg.ce_weight_sskd * cross_entropy(s_nor, target),
            "kd": cfg.kd_weight_sskd * masked_kl(s_nor, t_nor, cfg.kd_temperature, torch.ones_like(target, dtype=bool)),
            "tf": cfg.sskd_tf_weight * masked_kl(s_aug, t_aug, cfg.sskd_tf_temperature, keep_tf),
            "ss": cfg.sskd_ss_weight * masked_kl(s_sim, t_sim, cfg.sskd_ss_temperature, keep_ss)}


@register_distiller("sskd")
class SSKD(Distiller):
    """SSKD on the ``pooled`` taps of both networks, with a projection head on each; the teacher's is
    trained in the teacher phase (:meth:`teacher_phase_loss`) and frozen for the student's."""

    student_taps = ("pooled",)
    teacher_taps = ("pooled",)
    Settings = SSKDSettings

    def __init__(self, settings, student_shapes, teacher_shapes, *, num_samples, num_classes):
        super().__init__(settings, student_shapes, teacher_shapes, num_samples=num_samples, num_classes=num_classes)
        (d_s,) = feature_shape("sskd", "student", student_shapes, "pooled", 2)
        (d_t,) = feature_shape("sskd", "teacher", teacher_shapes, "pooled", 2)
        self.student_head = ProjectionHead(d_s)
        self.teacher_head = ProjectionHead(d_t).requires_grad_(False)
        self.register_buffer("teacher_phase_done", torch.zeros((), dtype=torch.bool))

    def views(self, x: torch.Tensor) -> torch.Tensor:
        return rotated_views(x)

    def observed_rows(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[::VIEWS]

    @property
    def teacher_phase_epochs(self) -> int:
        return self.settings.sskd_head_epochs

    def teacher_phase_optimizer(self, momentum: float, weight_decay: float):
        epochs = self.settings.sskd_head_epochs
        optimizer = torch.optim.SGD(self.teacher_head.parameters(), lr=self.settings.sskd_head_lr,
                                    momentum=momentum, weight_decay=weight_decay)
        milestones = [epochs // 2, epochs * 3 // 4]  # the authors' [30, 45] of 60
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)

    def teacher_phase_loss(self, teacher, batch):
        loss, right = head_loss(self.teacher_head(teacher["pooled"].detach()))
        return loss, {"head_loss": loss.detach(), "head_accuracy": right.detach()}

    def forward(self, student, teacher, batch):
        s_repr = self.student_head(student["pooled"])
        with torch.no_grad():
            t_repr = self.teacher_head(teacher["pooled"])
        terms = sskd_terms(student["logits"], teacher["logits"], s_repr, t_repr, batch.target, self.settings)
        return sum(terms.values()), {k: v.detach() for k, v in terms.items()}
