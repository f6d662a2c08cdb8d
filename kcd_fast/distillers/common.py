"""What the feature distillers share: settings checked when made, per-dataset defaults, and the checks
of the tapped shapes they are built from (each a one-line ValueError naming the option and what was
expected, raised at construction)."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kcd_fast.checks import check_int, check_real

__all__ = ["CheckedSettings", "IMAGENET_DATASETS", "upcast", "feature_shape", "cross_entropy", "warmup_factor"]

# Datasets whose defaults are the ImageNet column of the literature; every other dataset gets the
# CIFAR-100 ones.
IMAGENET_DATASETS = ("imagenet",)


class CheckedSettings:
    """Mixin of a frozen settings dataclass: fields ending in ``_warmup`` are ints >= 0, those ending
    in ``_p`` finite numbers > 0, every other one a finite number >= 0 (a loss weight).

    ``IMAGENET`` (a dict of field -> value, on the class) holds the defaults that differ on ImageNet;
    :meth:`defaults` gives the settings of a dataset."""

    IMAGENET: dict = {}

    def __post_init__(self):
        op = type(self).__name__
        for field in dataclasses.fields(self):
            x = getattr(self, field.name)
            if field.name.endswith("_warmup"):
                check_int(op, field.name, x, 0)
            elif field.name.endswith("_p"):
                check_real(op, field.name, x, lo=0.0, lo_open=True)
            else:
                check_real(op, field.name, x, lo=0.0)

    @classmethod
    def defaults(cls, dataset: str = "cifar100"):
        """The literature's defaults for ``dataset``: the ImageNet ones for ImageNet, else CIFAR-100's."""
        key = str(dataset).lower().replace("_", "-")
        return cls(**(cls.IMAGENET if key in IMAGENET_DATASETS else {}))


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision features (autocast) in float32 for the loss; float32 and float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def feature_shape(op: str, who: str, shapes: dict, name: str, dim: int) -> tuple[int, ...]:
    """The shape of tap ``name`` in ``shapes`` (the ``who`` model's: "student" or "teacher") without
    its batch dimension, checked to be ``dim``-D with the batch ([B, C] or [B, C, H, W]), no size 0."""
    if name not in shapes:
        raise ValueError(f"{op}: `{who}_shapes` must hold the tap {name!r}, got {sorted(shapes)}")
    shape = tuple(int(s) for s in shapes[name])
    if len(shape) != dim or 0 in shape:
        layout = "[B, C]" if dim == 2 else "[B, C, H, W]"
        raise ValueError(f"{op}: `{who}_shapes[{name!r}]` must be a {layout} shape with no size 0, "
                         f"got {list(shape)}")
    return shape[1:]


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The student's cross-entropy with the labels, in float32 at least."""
    return F.cross_entropy(upcast(logits), target)


def warmup_factor(epoch: int, warmup: int) -> float:
    """A linear warm-up over ``warmup`` epochs, (epoch + 1) / warmup capped at 1, for the 0-based
    ``epoch`` (mdistiller's epoch / warmup for its 1-based epoch; 1 when ``warmup`` is 0). A host
    number: the epoch is a Python int, so no synchronisation."""
    return 1.0 if warmup <= 0 else min((epoch + 1) / warmup, 1.0)
