"""Distillers: the losses the student learns from, logit and feature ones, in one registry.

Each is a :class:`Distiller` (an ``nn.Module``, :mod:`kcd_fast.distillers.base`) registered under
its ``--distill`` name, with a frozen ``Settings`` dataclass whose defaults are the literature's:

* ``kd``, ``dkd``: the logit losses of :mod:`kcd_fast.distill`, without taps
  (:mod:`kcd_fast.distillers.logit`).
* ``fitnet``: FitNets' hint loss on ``stage2`` through a conv regressor (:mod:`.fitnet`).
* ``at``: attention transfer over the stages (:mod:`.at`).
* ``pkt``: probabilistic knowledge transfer on the penultimate features (:mod:`.pkt`).
* ``reviewkd``: knowledge review, ABF + HCL, on the teacher's pre-ReLU stages (:mod:`.reviewkd`).
* ``crd``: contrastive representation distillation with memory banks (:mod:`.crd`).
* ``sskd``: self-supervised KD on four rotated views, with a teacher-head phase (:mod:`.sskd`).

Feature distillers read named taps of the two networks, recorded by forward hooks
(:mod:`kcd_fast.distillers.taps`). :func:`build_distiller` puts a distiller together for a pair of
networks; docs/distillers.md describes each method, its taps, its defaults and their sources.
"""
from kcd_fast.distillers import at, crd, fitnet, logit, pkt, reviewkd, sskd  # noqa: F401  (they register themselves)
from kcd_fast.distillers.base import DISTILLERS, Batch, Distiller, register_distiller
from kcd_fast.distillers.build import (
    BuiltDistiller,
    build_distiller,
    default_settings,
    distiller_class,
    distiller_settings,
    select_taps,
)
from kcd_fast.distillers.taps import FeatureTaps, TapPoint, architecture_name, probe_shapes, tap_points

__all__ = [
    "DISTILLERS", "Batch", "Distiller", "register_distiller", "BuiltDistiller", "build_distiller",
    "default_settings", "distiller_class", "distiller_settings", "select_taps", "FeatureTaps", "TapPoint",
    "architecture_name", "probe_shapes", "tap_points",
]
