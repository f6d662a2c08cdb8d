"""The distiller interface: a module that names the feature taps it needs and returns its loss.

A distiller is an ``nn.Module`` built once from the tapped shapes. Its trainable parts (connectors,
embedding heads, memory banks) train with the student: the trainer gives the student and the
distiller one optimizer and wraps them in one DDP module, so all their gradients are all-reduced.

``forward(student, teacher, batch)`` takes two dicts of tensors, tap name -> value, each with the
key ``"logits"`` besides the taps the distiller declared, and a :class:`Batch`; it returns
``(loss, logs)``: a scalar tensor and a dict of detached scalar tensors to log (never ``.item()``:
the step must not synchronise with the host).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

DISTILLERS: dict[str, type["Distiller"]] = {}


@dataclasses.dataclass(frozen=True)
class Batch:
    """What a distiller may read of the batch besides the model outputs: the labels [B] (int64),
    the dataset indices [B] (int64, on the device) and the 0-based epoch."""

    target: torch.Tensor
    index: torch.Tensor
    epoch: int


class Distiller(nn.Module):
    """Base class. Subclasses set ``name``, ``student_taps``, ``teacher_taps`` (canonical tap names,
    see :mod:`kcd_fast.distillers.taps`) and ``Settings`` (a frozen dataclass of the options the
    method reads, its field names the trainer's option names, its defaults the literature's), and
    implement ``forward``. ``needs_teacher_features`` is True when the loss needs the teacher's
    features of the current view, which a cached-knowledge run cannot provide."""

    name: str = ""
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()
    Settings: type = type(None)

    @property
    def needs_teacher_features(self) -> bool:
        return bool(self.teacher_taps)

    def __init__(self, settings, student_shapes: dict[str, torch.Size],
                 teacher_shapes: dict[str, torch.Size], *, num_samples: int, num_classes: int):
        super().__init__()
        self.settings = settings

    def forward(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """The inputs both networks run on, made from a batch's inputs on the device (SSKD: its rotated
        copies); the batch itself by default. Also called once on the probing sample when the
        distiller is built, so inputs it cannot take are refused before any training."""
        return x

    def observed_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """The rows of the student's logits that belong to the batch's own inputs (what the condenser
        records, Eq. 12), from its logits of :meth:`views`; all of them by default."""
        return logits

    # A phase before the student's that trains teacher-side parts on the frozen teacher (SSKD's head):
    # ``teacher_phase_epochs`` > 0 epochs over the whole training set, each step's loss from
    # ``teacher_phase_loss(teacher_outputs, batch) -> (loss, logs)`` with the optimizer and schedule of
    # ``teacher_phase_optimizer(momentum, weight_decay)``; the bool buffer ``teacher_phase_done``,
    # saved with the distiller's state, says it has run.
    @property
    def teacher_phase_epochs(self) -> int:
        return 0

    def teacher_phase_optimizer(self, momentum: float, weight_decay: float):
        raise NotImplementedError

    def teacher_phase_loss(self, teacher: dict[str, torch.Tensor],
                           batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


def register_distiller(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    """Class decorator: make ``cls`` the distiller of ``--distill name``."""
    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Distiller)):
            raise TypeError(f"register_distiller({name!r}): expected a Distiller subclass, got {cls!r}")
        cls.name = name
        DISTILLERS[name] = cls
        return cls
    return deco
