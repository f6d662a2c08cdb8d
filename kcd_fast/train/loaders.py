"""The training data as the trainer feeds it: the subset, the per-epoch seeds, the loader over the
condensed set (or over every sample for ``--no-kcd``), and the device-resident batches of
``--fake-on-device``."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from kcd_fast.data import InMemoryImageDataset, eval_view
from kcd_fast.sampling import KCDDataset, NoSingletonBatches, mix_inputs
from kcd_fast.train import jpeg_loader
from kcd_fast.train.config import UserError


@dataclass
class TrainData:
    """The samples the run trains on (``train``, N of them), the same samples with the evaluation
    transform (``train_eval``, read by the one-off knowledge fill), the validation split, and with
    ``--fake-on-device`` the (x, y) tensors resident on the device (``resident``, else None)."""

    train: object
    train_eval: object
    val: object
    num_classes: int
    in_channels: int
    resident: tuple | None = None

    @property
    def n(self) -> int:
        return len(self.train)


def subset(dataset, size: int, seed: int):
    """The first ``size`` samples of a fixed shuffle drawn from ``seed`` (all of them for 0)."""
    if not size or size >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed + 999)
    return Subset(dataset, torch.randperm(len(dataset), generator=g)[:size].sort().values.tolist())


def train_data(cfg, bundle) -> TrainData:
    """``--train-subset`` of the training split, its evaluation view, and the resident tensors of
    ``--fake-on-device`` (stored channels_last on CUDA, as the steps use them: a gathered batch then
    is channels_last already, and the step's conversion copies nothing)."""
    if cfg.train_subset > len(bundle.train):
        raise UserError(f"--train-subset {cfg.train_subset}: the {cfg.dataset} training set has only "
                        f"{len(bundle.train)} samples (0: all of them)")
    train = subset(bundle.train, cfg.train_subset, cfg.seed)
    data = TrainData(train, subset(eval_view(bundle), cfg.train_subset, cfg.seed), bundle.val, bundle.num_classes,
                     bundle.in_channels)
    if cfg.fake_on_device:  # --dataset fake, checked with the options
        device = torch.device(cfg.device)
        x, y = train.materialize(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        data.resident, data.val = (x, y), bundle.val.materialize(device)
        # The one-off fill must see the very images the student trains on (materialize's noise is not
        # __getitem__'s); device tensors are read in this process, without loader workers.
        data.train_eval = torch.utils.data.TensorDataset(x, y)
    data.val, data.train_eval = eval_set(cfg, data.val), eval_set(cfg, data.train_eval)
    return data


def eval_set(cfg, dataset):
    """``dataset`` as evaluation and the one-off fill read it: with ``--loader cpu``/``gpu`` a folder split
    read in batches of JPEGs (:class:`kcd_fast.train.jpeg_loader.JpegSplit`), else as it is."""
    return jpeg_loader.JpegSplit(dataset, cfg) if jpeg_loader.uses_jpeg_loader(cfg) else dataset


def pixel_buffer(train_set):
    """The uint8 images a training set holds in memory, and each of its samples' row in them
    (``--protocol official`` mixes those pixels in place, as the official code mixes CIFAR's), or
    None for a set that reads its images from files or makes them (ImageNet folders, fake data)."""
    base, rows = train_set, None
    if isinstance(train_set, Subset):
        base, rows = train_set.dataset, torch.as_tensor(train_set.indices, dtype=torch.int64)
    images = getattr(base, "images", None)
    if not isinstance(base, InMemoryImageDataset) or not isinstance(images, torch.Tensor):
        return None
    return images, rows if rows is not None else torch.arange(len(base))


# The random streams of a run, each seeded per (seed, epoch, rank) by epoch_seed.
SEED_STREAMS = {"torch": 0, "loader": 1, "teacher_phase": 2, "teacher_phase_loader": 3}


def epoch_seed(seed: int, epoch: int, rank: int, stream: str) -> int:
    """The seed of one random stream ("torch": this process's augmentation and dropout, "loader": its
    loader workers'; "teacher_phase", "teacher_phase_loader": the same in a distiller's teacher phase)
    for (seed, epoch, rank): distinct for every rank and epoch, and the same again when a run is
    resumed."""
    words = [seed & 0xFFFF_FFFF_FFFF_FFFF, epoch, rank, SEED_STREAMS[stream]]  # any int seed
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


class Indexed(torch.utils.data.Dataset):
    """(x, y) -> (x, y, index), for the ``--no-kcd`` baseline."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, y, i


class DeviceBatches:
    """Batches gathered from data resident on the device, in the sampler's order (``--fake-on-device``).

    With a condenser and ``mix``, K1L inputs are mixed with their K0 partners on the device (Eq. 14,
    :func:`kcd_fast.sampling.mix_inputs`), as :class:`kcd_fast.KCDDataset` does in loader workers.
    """

    def __init__(self, x, y, sampler, batch_size, condenser=None, mix=True):
        self.x, self.y, self.sampler, self.batch_size = x, y, sampler, batch_size
        self.condenser, self.mix = condenser, mix

    def __len__(self):
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self):
        order = self.sampler.indices() if hasattr(self.sampler, "indices") else torch.tensor(list(iter(self.sampler)))
        order = order.to(self.x.device)
        bs = self.batch_size
        mixing = self.condenser is not None and self.mix
        if mixing:
            # The positions of this epoch's K1L points (the few with a K0 partner), found once per epoch
            # (one host sync here, none per step): each batch then mixes only its own K1L rows.
            pos = (self.condenser.partner[order] >= 0).nonzero().squeeze(1)
            bounds = torch.searchsorted(pos.cpu(), torch.arange(0, order.numel() + bs, bs)).tolist()
        # The condenser's measured cost counts what its samplers yield: counted here per batch.
        counted = self.condenser is not None and hasattr(self.sampler, "indices")
        epoch = getattr(self.sampler, "epoch", 0)
        for b, i in enumerate(order.split(bs)):
            if counted:
                self.condenser.count_yielded(epoch, i.numel())
            x = self.x[i]
            if mixing and bounds[b + 1] > bounds[b]:
                rows = pos[bounds[b]: bounds[b + 1]] - b * bs
                j = i[rows]
                x[rows] = mix_inputs(x[rows], self.x[self.condenser.partner[j].long()], self.condenser.eps[j])
            yield x, self.y[i], i


def train_loader(cfg, data: TrainData, condenser, mix: bool):
    """The epoch loader and its sampler: the condenser's sampler over the condensed set (VAKS on the
    inputs with ``mix``), or a DistributedSampler over every sample without a condenser. Returns
    (loader, sampler, generator), the generator seeding the loader workers. ``--loader cpu``/``gpu``:
    :func:`kcd_fast.train.jpeg_loader.train_loader`."""
    if jpeg_loader.uses_jpeg_loader(cfg):
        return jpeg_loader.train_loader(cfg, data, condenser, mix)
    if condenser is not None:
        dataset, sampler = KCDDataset(data.train, condenser, mix=mix), condenser.sampler()
    else:
        dataset = Indexed(data.train)
        sampler = DistributedSampler(dataset, num_replicas=cfg.world_size, rank=cfg.rank, shuffle=True,
                                     seed=cfg.seed)
    generator = torch.Generator()
    batch = cfg.batch_size // cfg.world_size
    if data.resident is not None:
        return DeviceBatches(*data.resident, sampler, batch, condenser, mix=mix), sampler, generator
    loader = DataLoader(dataset, batch_sampler=NoSingletonBatches(sampler, batch), num_workers=cfg.workers,
                        pin_memory=str(cfg.device).startswith("cuda"), generator=generator, persistent_workers=False)
    return loader, sampler, generator


def epoch_owner(sampler, cfg, epoch: int, n: int) -> torch.Tensor:
    """The rank whose batches held each sample in ``epoch`` (the lowest, for DDP padding repeats)."""
    owner = torch.full((n,), -1, dtype=torch.int64)
    for r in reversed(range(cfg.world_size)):
        if isinstance(sampler, DistributedSampler):
            other = DistributedSampler(sampler.dataset, num_replicas=cfg.world_size, rank=r, shuffle=sampler.shuffle,
                                       seed=sampler.seed)
            other.set_epoch(epoch)
            idx = torch.tensor(list(iter(other)), dtype=torch.int64)
        else:
            other = sampler.condenser.sampler(rank=r, world_size=cfg.world_size, shuffle=sampler.shuffle)
            other.set_epoch(epoch)
            idx = other.indices()
        owner[idx] = r
    return owner
