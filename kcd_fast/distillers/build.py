"""Building a registered distiller for a (student, teacher) pair: its settings, the taps it reads from
each network, their shapes (one probing forward) and the hooks that record them.

A distiller class declares its taps in ``student_taps`` / ``teacher_taps``. One whose taps depend
on the pair (how many stages both networks have) also defines a classmethod
``tap_selection(student_available, teacher_available) -> (student_taps, teacher_taps)``, given the
tap names each network offers; :func:`select_taps` calls it, and :func:`build_distiller` sets the
chosen names on the instance.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from kcd_fast.distill import settings_from_config
from kcd_fast.distillers.base import DISTILLERS, Distiller
from kcd_fast.distillers.taps import FeatureTaps, probe_shapes, tap_points

__all__ = ["distiller_class", "default_settings", "distiller_settings", "select_taps", "BuiltDistiller",
           "build_distiller"]


def distiller_class(name: str) -> type[Distiller]:
    """The distiller registered as ``name``; ValueError listing the registered ones otherwise."""
    if name not in DISTILLERS:
        raise ValueError(f"distiller_class: no distiller is registered as {name!r}; registered: "
                         f"{', '.join(sorted(DISTILLERS))}")
    return DISTILLERS[name]


def default_settings(name: str, dataset: str = "cifar100"):
    """The settings of distiller ``name`` with the literature's defaults for ``dataset`` (the ImageNet
    ones where they differ, see each ``Settings``; CIFAR-100's for every other dataset)."""
    kind = distiller_class(name).Settings
    return kind.defaults(dataset) if hasattr(kind, "defaults") else kind()


def distiller_settings(name: str, config):
    """The settings of distiller ``name`` built from the attributes of ``config`` of the same names
    (e.g. the trainer's configuration); ValueError naming any it lacks."""
    return settings_from_config(distiller_class(name).Settings, config, "distiller_settings",
                                f"the distiller {name!r}")


def select_taps(cls: type[Distiller], student: nn.Module | None,
                teacher: nn.Module | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(student taps, teacher taps) that ``cls`` reads for this pair: its ``tap_selection`` of the taps
    the two networks offer where it has one, else its class attributes."""
    selection = getattr(cls, "tap_selection", None)
    if selection is None or student is None or teacher is None:
        return tuple(cls.student_taps), tuple(cls.teacher_taps)
    s_names, t_names = selection(tuple(tap_points(student)), tuple(tap_points(teacher)))
    return tuple(s_names), tuple(t_names)


class BuiltDistiller(NamedTuple):
    """A distiller and the hooks that record its taps (None for a network it reads no tap of)."""

    distiller: Distiller
    student_taps: FeatureTaps | None
    teacher_taps: FeatureTaps | None


def build_distiller(name: str, settings, student: nn.Module, teacher: nn.Module | None,
                    sample: torch.Tensor, *, num_samples: int, num_classes: int,
                    student_label: str | None = None, teacher_label: str | None = None) -> BuiltDistiller:
    """Build distiller ``name`` with ``settings`` for ``student`` and ``teacher`` (None: no teacher
    network, for a distiller that reads no teacher tap): choose its taps (:func:`select_taps`),
    probe their shapes with one eval-mode forward of ``sample`` (e.g. a batch of zeros of the
    training size, on the models' device; BN statistics untouched), construct it, and hook the taps.
    The labels name the models in errors (default: their class names).

    Each step, run the student and the teacher as usual, then pass ``{"logits": ..., **taps.values}``
    of each to the distiller."""
    cls = distiller_class(name)
    s_names, t_names = select_taps(cls, student, teacher)
    if t_names and teacher is None:
        raise ValueError(f"build_distiller: the distiller {name!r} reads the teacher's taps {list(t_names)}, "
                         f"so `teacher` must be a network, got None")
    s_shapes = probe_shapes(student, s_names, sample, label=student_label) if s_names else {}
    t_shapes = probe_shapes(teacher, t_names, sample, label=teacher_label) if t_names else {}
    distiller = cls(settings, s_shapes, t_shapes, num_samples=num_samples, num_classes=num_classes)
    distiller.views(sample)  # refuses inputs the method cannot take (SSKD: images that are not square)
    distiller.student_taps, distiller.teacher_taps = s_names, t_names
    distiller.to(next(iter(student.parameters())).device)
    s_taps = FeatureTaps(student, s_names, label=student_label) if s_names else None
    t_taps = FeatureTaps(teacher, t_names, label=teacher_label) if t_names else None
    return BuiltDistiller(distiller, s_taps, t_taps)
