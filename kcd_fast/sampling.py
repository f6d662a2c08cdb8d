"""Feeding the condensed set to a DataLoader: the sampler of K^, the dataset wrapper that applies
VAKS to the inputs (Eq. 14), and the batching that never leaves one sample alone.

These take the condenser duck-typed (see each class), so that this module does not depend on
:mod:`kcd_fast.condenser`.
"""
from __future__ import annotations

from numbers import Integral
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from kcd_fast.checks import check_int

__all__ = ["KeptSampler", "KCDDataset", "NoSingletonBatches", "mix_inputs"]


class KeptSampler(Sampler):
    """Samples the condensed set K^ of a :class:`~kcd_fast.KnowledgeCondenser`; its length changes per stage.

    ``condenser``: anything with ``kept_indices()``, ``seed`` and ``count_yielded(epoch, count)``
    (the samples it yields are counted there, for the measured cost C).

    * ``batch_size=None``: yields indices (use ``DataLoader(sampler=...)``).
      ``batch_size=B``: yields lists of B indices (use ``DataLoader(batch_sampler=...)``); with
      ``drop_last`` the final short batch is dropped.
    * DDP: rank r of W gets a disjoint share of a common shuffled order; the order is padded by
      repeating its head (or, with ``drop_last`` and no batch_size, cut) so every rank yields
      the same number of samples and steps the same number of batches.
    * Shuffles with its own generator seeded by (seed, epoch): call :meth:`set_epoch`. It never
      touches the global RNG and never patches DataLoader.
    """

    def __init__(self, condenser, *, batch_size=None, shuffle=True, drop_last=False, rank=0, world_size=1):
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, Integral)
                                       or batch_size < 1):
            raise ValueError(f"sampler: `batch_size` must be None or an int >= 1, got {batch_size!r}")
        rank = check_int("sampler", "rank", rank)
        world_size = check_int("sampler", "world_size", world_size, 1)
        if not 0 <= rank < world_size:
            raise ValueError(f"sampler: `rank` must lie in [0, world_size={world_size}), got {rank}")
        self.condenser = condenser
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _share_size(self, kept: int) -> int:
        if self.drop_last and self.batch_size is None:
            return kept // self.world_size
        return -(-kept // self.world_size)

    def indices(self) -> torch.Tensor:
        """This rank's indices for the current epoch, in yield order."""
        kept = self.condenser.kept_indices()
        if self.shuffle:
            g = torch.Generator().manual_seed(self.condenser.seed * 1_000_003 + 7919 * self.epoch + 1)
            kept = kept[torch.randperm(kept.numel(), generator=g)]
        share = self._share_size(kept.numel())
        total = share * self.world_size
        if total > kept.numel():
            reps = -(-total // max(kept.numel(), 1))
            kept = kept.repeat(reps)
        return kept[:total][self.rank::self.world_size]

    def __len__(self) -> int:
        share = self._share_size(self.condenser.kept_indices().numel())
        if self.batch_size is None:
            return share
        return share // self.batch_size if self.drop_last else -(-share // self.batch_size)

    def __iter__(self) -> Iterator:
        idx = self.indices()
        epoch = self.epoch
        if self.batch_size is None:
            count = 0
            try:
                for i in idx.tolist():
                    count += 1
                    yield i
            finally:
                self.condenser.count_yielded(epoch, count)
        else:
            b = self.batch_size
            stop = (idx.numel() // b) * b if self.drop_last else idx.numel()
            for s in range(0, stop, b):
                batch = idx[s:s + b].tolist()
                self.condenser.count_yielded(epoch, len(batch))
                yield batch


class KCDDataset(Dataset):
    """Wraps a map-style dataset of (x, y) into one of (x, y, index), with VAKS on the inputs.

    ``condenser``: anything with ``num_samples`` and the host arrays ``host_partner`` (int32 [N], -1
    outside K1L) and ``host_eps`` (float32 [N]), in shared memory so that loader workers see each
    stage's pairs.

    For a point of K1L with partner j and ratio ε (Eq. 14), it returns
    ``(1 - ε) x + ε x_j``, each transformed first, with the point's own label.
    It runs in the loader workers, so the GPU does no extra pass and the
    teacher sees the same mixed input as the student. Each stage mixes the original inputs, so the
    mixes do not compound (mixes that do, in a buffer held in memory:
    :meth:`KnowledgeCondenser.mix_buffer_`, or the official code's truncating pixel mixing,
    :func:`kcd_fast.official.mix_pixels_`). ``mix=False`` returns
    plain (x, y, index) (the VAKS then lives elsewhere, e.g. in a soft-label buffer).
    """

    def __init__(self, dataset: Dataset, condenser, mix: bool = True):
        n = len(dataset)
        if n != condenser.num_samples:
            raise ValueError(f"KCDDataset: the dataset has {n} samples but the condenser was made for "
                             f"num_samples={condenser.num_samples}")
        self.dataset = dataset
        self.mix = bool(mix)
        self.partner = condenser.host_partner   # shared memory: updated in place at each stage
        self.eps = condenser.host_eps

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x, y = self.dataset[index]
        if self.mix:
            j = int(self.partner[index])
            if j >= 0:
                e = float(self.eps[index])
                xj, _ = self.dataset[j]
                try:
                    x = mix_inputs(x, xj, e)
                except _NotMixable:
                    raise TypeError(f"KCDDataset: VAKS mixes inputs that are tensors or numpy arrays of numbers, "
                                    f"but sample {index} is {type(x).__name__} and its partner {type(xj).__name__}; "
                                    f"give the wrapped dataset a transform that returns tensors (e.g. ToTensor), "
                                    f"or use mix=False") from None
        return x, y, index


class _NotMixable(TypeError):
    """Inputs :func:`mix_inputs` cannot mix (neither tensors nor numpy arrays of numbers)."""


def mix_inputs(x, partner, eps):
    """Adaptive knowledge augmentation on inputs (Eq. 14): ``(1 - eps) x + eps partner``.

    * One sample: ``x`` and ``partner`` tensors (or numpy arrays) of one shape, ``eps`` a number.
    * A batch: ``x`` and ``partner`` tensors [P, ...], ``eps`` a float tensor [P], one ratio per row.

    The result has the type and dtype of ``x``, so mixed and plain samples collate together: float
    inputs are mixed in their own dtype; integer ones (uint8 images) in fp32, rounded to nearest
    (ties to even, as :func:`kcd_fast.ops.vaks_mix_` does) and clamped to their dtype's range.
    """
    if isinstance(x, torch.Tensor) and isinstance(partner, torch.Tensor):
        per_row = isinstance(eps, torch.Tensor)
        if per_row:
            eps = eps.view(-1, *([1] * (x.dim() - 1)))
        if x.dtype.is_floating_point:
            e = eps.to(x.dtype) if per_row else eps
            return (1 - e) * x + e * partner.to(x.dtype)
        if x.dtype != torch.bool:
            e = eps.to(torch.float32) if per_row else eps
            info = torch.iinfo(x.dtype)
            mixed = (1 - e) * x.float() + e * partner.float()
            return mixed.round().clamp(info.min, info.max).to(x.dtype)
    elif isinstance(x, np.ndarray) and isinstance(partner, np.ndarray) and not isinstance(eps, torch.Tensor):
        if np.issubdtype(x.dtype, np.floating):
            return ((1.0 - eps) * x + eps * partner).astype(x.dtype, copy=False)
        if np.issubdtype(x.dtype, np.integer):
            info = np.iinfo(x.dtype)
            mixed = (1.0 - eps) * x.astype(np.float32) + eps * partner.astype(np.float32)
            return np.clip(np.rint(mixed), info.min, info.max).astype(x.dtype)
    raise _NotMixable(f"mix_inputs: VAKS mixes tensors or numpy arrays of numbers, got {type(x).__name__} and a "
                      f"partner {type(partner).__name__}")


class NoSingletonBatches(torch.utils.data.Sampler):
    """The sampler's order in batches of ``batch_size``, where a last batch of one sample joins the
    batch before it: BatchNorm cannot train on one sample (a condensed set's size is anything), and
    every kept point is still seen, and recorded, once an epoch."""

    def __init__(self, sampler, batch_size: int):
        self.sampler, self.batch_size = sampler, batch_size

    def __len__(self):
        n, bs = len(self.sampler), self.batch_size
        return -(-n // bs) - (n > bs and n % bs == 1)

    def __iter__(self):
        held, batch = None, []  # the last full batch is held back until it is known whether one sample follows
        for i in self.sampler:
            batch.append(int(i))
            if len(batch) == self.batch_size:
                if held is not None:
                    yield held
                held, batch = batch, []
        if held is not None and len(batch) == 1:
            held, batch = held + batch, []
        if held is not None:
            yield held
        if batch:
            yield batch
