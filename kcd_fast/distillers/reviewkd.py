"""Knowledge review (Chen, Liu, Zhao & Jia, CVPR 2021, "Distilling Knowledge via Knowledge Review").

The student's features of every level, deepest first, go through attention-based fusion (ABF)
modules: each transforms its level (1x1 conv + BN), fuses it with the residual output of the deeper
level (upsampled, nearest) by two per-pixel attention weights (a 1x1 conv of their concatenation
and a sigmoid), and yields (through a 3x3 conv + BN) the feature compared with the teacher's feature
of the same level. The hierarchical context loss HCL compares them at the full resolution and at
4x4, 2x2 and 1x1 average pools, with weights 1, 1/2, 1/4, 1/8 (levels the map does not exceed are
skipped), normalised by their sum: for each level, sum_l w_l MSE(pool_l(F_S), pool_l(F_T)) / sum_l w_l,
summed over the levels. The loss is CE + lambda sum_i D(F_S^i, F_T^i), D = HCL and F_S^i the fused
student features (the paper's Sec. 3: review mechanism, residual learning framework, ABF and HCL).

As the authors' code (dvlab-research/ReviewKD, and mdistiller's ``ReviewKD``): the levels are every
stage both networks have plus the penultimate feature (``pooled`` as a 1x1 map); the student's
stages after their ReLU (``stage{i}``), the teacher's before it (``stage{i}_pre``); the ABF width
is min(512, the student's penultimate width); its convs start from ``kaiming_uniform_(a=1)``; the
student's map, where it differs, is resized to the teacher's (nearest) before the 3x3 conv.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from kcd_fast.distillers.base import Distiller, register_distiller
from kcd_fast.distillers.common import CheckedSettings, cross_entropy, feature_shape, upcast, warmup_factor
from kcd_fast.distillers.taps import stage_names

__all__ = ["ReviewKDSettings", "ABF", "hcl_loss", "ReviewKD"]

MAX_MID_CHANNELS = 512  # the authors' cap on the ABF width (mdistiller's REVIEWKD.MAX_MID_CHANNEL)


@dataclasses.dataclass(frozen=True)
class ReviewKDSettings(CheckedSettings):
    """``ce_weight_reviewkd`` CE + warm-up * ``reviewkd_weight`` HCL, the warm-up linear over
    ``reviewkd_warmup`` epochs. CIFAR-100 defaults: mdistiller's CIFAR config for resnet32x4 ->
    resnet8x4 (weight 5, warm-up 20, CE 1), the weight of most pairs in the authors' script (8 for
    ShuffleV2, 0.6 for resnet56 -> resnet20, 1 for resnet110 -> resnet32). ImageNet: mdistiller's
    ResNet34 -> ResNet18 config (weight 1, warm-up 1)."""

    ce_weight_reviewkd: float = 1.0
    reviewkd_weight: float = 5.0
    reviewkd_warmup: int = 20

    IMAGENET = {"reviewkd_weight": 1.0, "reviewkd_warmup": 1}


class ABF(nn.Module):
    """Attention-based fusion: ``forward(x, residual, out_size) -> (output, residual)``. ``x`` the
    student's feature of this level, ``residual`` the deeper level's residual (None for the
    deepest, built with ``fuse=False``), ``out_size`` the teacher's (H, W) of this level."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, residual, out_size):
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:]  # the two attention maps weigh the two inputs
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def hcl_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """HCL of one level: the MSE at full resolution and of the 4x4, 2x2, 1x1 adaptive average pools
    smaller than the map's height, weighted 1, 1/2, 1/4, ... and divided by the weights' sum."""
    student, teacher = upcast(student), upcast(teacher)
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for size in (4, 2, 1):
        if size >= student.shape[2]:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
        total += weight
    return loss / total


def _level_shape(who: str, shapes: dict, name: str) -> tuple[int, int, int]:
    """(C, H, W) of a level: a stage's feature, or ``pooled`` as a 1x1 map."""
    if name == "pooled":
        return feature_shape("reviewkd", who, shapes, name, 2) + (1, 1)
    return feature_shape("reviewkd", who, shapes, name, 4)


@register_distiller("reviewkd")
class ReviewKD(Distiller):
    """Knowledge review with ABF and HCL. ``student_taps`` / ``teacher_taps`` are those of the zoo's
    3-stage networks; :meth:`tap_selection` gives a pair's own (every stage both have)."""

    student_taps = ("stage1", "stage2", "stage3", "pooled")
    teacher_taps = ("stage1_pre", "stage2_pre", "stage3_pre", "pooled")
    Settings = ReviewKDSettings

    @classmethod
    def tap_selection(cls, student_available, teacher_available):
        """(student taps, teacher taps): the stages both networks have, then ``pooled``."""
        common = [n for n in stage_names(student_available) if n in set(stage_names(teacher_available))]
        return tuple(common) + ("pooled",), tuple(f"{n}_pre" for n in common) + ("pooled",)

    def __init__(self, settings, student_shapes, teacher_shapes, *, num_samples, num_classes):
        super().__init__(settings, student_shapes, teacher_shapes, num_samples=num_samples,
                         num_classes=num_classes)
        stages = stage_names(student_shapes)
        self.student_levels = tuple(stages) + ("pooled",)
        self.teacher_levels = tuple(f"{n}_pre" for n in stages) + ("pooled",)
        s_shapes = [_level_shape("student", student_shapes, n) for n in self.student_levels]
        t_shapes = [_level_shape("teacher", teacher_shapes, n) for n in self.teacher_levels]
        for s_name, t_name, s, t in zip(self.student_levels, self.teacher_levels, s_shapes, t_shapes):
            if t[1] % s[1] or t[2] % s[2]:
                raise ValueError(f"reviewkd: the teacher's {t_name} ({t[1]}x{t[2]}) must be the student's "
                                 f"{s_name} ({s[1]}x{s[2]}) times a whole number in both sides, since the "
                                 f"student's map is upsampled to it (nearest)")
        mid = min(MAX_MID_CHANNELS, s_shapes[-1][0])
        last = len(s_shapes) - 1
        self.abfs = nn.ModuleList(ABF(s[0], mid, t[0], fuse=i < last)
                                  for i, (s, t) in enumerate(zip(s_shapes, t_shapes)))
        self.out_sizes = tuple((t[1], t[2]) for t in t_shapes)

    def forward(self, student, teacher, batch):
        cfg = self.settings
        feats = [student[n] if n != "pooled" else student[n][:, :, None, None] for n in self.student_levels]
        targets = [teacher[n] if n != "pooled" else teacher[n][:, :, None, None] for n in self.teacher_levels]
        out, residual = self.abfs[-1](feats[-1], None, self.out_sizes[-1])
        outputs = [out]
        for i in range(len(feats) - 2, -1, -1):  # the deeper levels' residual reviews the shallower ones
            out, residual = self.abfs[i](feats[i], residual, self.out_sizes[i])
            outputs.insert(0, out)
        review = sum(hcl_loss(o, t) for o, t in zip(outputs, targets))
        ce = cross_entropy(student["logits"], batch.target)
        scale = cfg.reviewkd_weight * warmup_factor(batch.epoch, cfg.reviewkd_warmup)
        terms = {"ce": cfg.ce_weight_reviewkd * ce, "reviewkd": scale * review}
        return terms["ce"] + terms["reviewkd"], {k: v.detach() for k, v in terms.items()}
