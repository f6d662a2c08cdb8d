"""``--loader cpu`` and ``--loader gpu``: the trainer's JPEG folders through :mod:`kcd_fast.jpeg`.

* cpu: the loader workers decode each file with ``torchvision.io.decode_jpeg`` and crop and flip it
  on uint8 (the crop drawn from (seed, epoch, dataset index)); the main process moves the uint8
  batch to the device and normalises it there, in the AMP dtype (a run on the CPU normalises in the
  workers: its main process trains on the same cores).
* gpu: the workers read file bytes and the JPEG header only, and draw each crop from the header's size;
  a batch leaves a worker as two tensors (:class:`kcd_fast.jpeg.EncodedBatch`). The main process
  decodes the batch with nvJPEG, then crops, resizes, flips and normalises it in one Triton launch
  (:func:`kcd_fast.jpeg.train_batch`), on a side stream, two batches ahead of the step in a thread of
  its own (:mod:`kcd_fast.train.prefetch`).

Crops come from per-sample generators, so they do not depend on the worker count, the batch a sample
lands in or the workers' RNG: the workers persist across epochs, and a resumed run draws the same
crops. The epoch travels with each index: :class:`PartnerBatches` yields :class:`Item` rows.

VAKS on the inputs (Eq. 14): instead of :class:`kcd_fast.KCDDataset`'s second load inside a worker,
:class:`PartnerBatches` appends each K1L point's partner to its batch, and :class:`TrainBatches` mixes
``x[k1l] = (1 - eps) x[k1l] + eps x[partner]`` on the device after normalisation, then drops the
partner rows: the step sees the batch's own rows, labels and indices, as ``(x, y, index)``. The row
positions and ratios travel with the batch as CPU tensors (no host sync per step).

Evaluation and the one-off knowledge fill read a split through :class:`JpegSplit`, with the
evaluation transform (shorter side to 256, centre 224).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset, default_collate

from kcd_fast import crops, jpeg
from kcd_fast.sampling import NoSingletonBatches, mix_inputs
from kcd_fast.train import prefetch
from kcd_fast.train.options import AMP_DTYPES

__all__ = ["Item", "partner_items", "PartnerBatches", "JpegFolderSet", "collate_items", "TrainBatches",
           "JpegSplit", "folder_samples", "train_loader", "uses_jpeg_loader"]

TRAIN_SIZE = 224  # RandomResizedCrop(224), as kcd_fast.data's ImageNet transform
EVAL_RESIZE = 256  # Resize(256) + CenterCrop(224)


def uses_jpeg_loader(cfg) -> bool:
    """Whether the run reads its folders through this module (``--loader cpu`` or ``gpu``)."""
    return getattr(cfg, "loader", "auto") in ("cpu", "gpu")


class Item(NamedTuple):
    """One row of a train batch as :class:`PartnerBatches` names it: the dataset ``index``, the ``epoch``
    its crop is drawn for; for a K1L point, the row of its partner in the same batch (``partner_row``,
    -1 otherwise) and its ratio ``eps``; ``own``: a row of the batch itself (False: a partner appended
    for the mix, dropped after it)."""

    index: int
    epoch: int
    partner_row: int = -1
    eps: float = 0.0
    own: bool = True


def partner_items(batch, epoch: int, partner=None, eps=None) -> list:
    """The rows of one batch: its indices as :class:`Item` s in their order, then each K1L point's partner
    (``partner[i] >= 0``; ``partner`` int [N], -1 outside K1L, and ``eps`` float [N], host tensors or
    arrays), in the order of the points. Nothing else is added; two points sharing a partner append it
    twice. Without ``partner``, the batch's rows alone."""
    items = [Item(int(i), epoch) for i in batch]
    if partner is None:
        return items
    index = torch.as_tensor(batch, dtype=torch.int64)
    j = torch.as_tensor(partner)[index]  # one gather per batch, not one per row
    rows = (j >= 0).nonzero().flatten()
    for k, (row, p, e) in enumerate(zip(rows.tolist(), j[rows].tolist(), torch.as_tensor(eps)[index[rows]].tolist())):
        items[row] = items[row]._replace(partner_row=len(batch) + k, eps=e)
        items.append(Item(p, epoch, own=False))
    return items


class PartnerBatches(Sampler):
    """A batch sampler: ``sampler``'s order in batches of ``batch_size`` (a last batch of one joins the one
    before, :class:`kcd_fast.sampling.NoSingletonBatches`), each as :func:`partner_items` with
    ``sampler.epoch`` (read as each epoch's iteration starts), and with ``partner``/``eps`` (a
    condenser's ``host_partner``/``host_eps``, updated in place at each stage) its K1L partners
    appended. Under torchrun each rank's ``sampler`` yields its own shard, whose points bring their
    own partners."""

    def __init__(self, sampler, batch_size: int, partner=None, eps=None):
        self.sampler, self.batches = sampler, NoSingletonBatches(sampler, batch_size)
        self.partner, self.eps = partner, eps

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        epoch = int(getattr(self.sampler, "epoch", 0))
        for batch in self.batches:
            yield partner_items(batch, epoch, self.partner, self.eps)


class JpegFolderSet(jpeg.FileBytesDataset):
    """The images of a folder split as the loader workers read them. A key is an :class:`Item` (train:
    crop and flip drawn from (``seed``, epoch, index)) or an int index (evaluation: the centre crop).
    ``on_gpu``: the item is the file's bytes and its :func:`kcd_fast.jpeg.describe_file` row (header and,
    for training, the crop drawn from it; decoded on the GPU in the main process); else the uint8
    [3, 224, 224] crop, decoded here by ``decode_jpeg`` (PIL for what it does not read; a file neither
    reads raises :class:`kcd_fast.data.CorruptImageError` naming it); with ``normalize`` (a run on the
    CPU, which has no device to hand the normalisation to) the crop normalised here, float32. Items
    are ``(data, label, key, fallbacks)``, the last 1 for a file decoded by PIL here (the main process
    counts the GPU path's)."""

    def __init__(self, samples, on_gpu: bool, seed: int, normalize: bool = False):
        super().__init__(samples)
        self.on_gpu, self.seed, self.normalize = bool(on_gpu), int(seed), bool(normalize) and not on_gpu

    def paths(self, indices) -> list:
        """The files of ``indices`` (a tensor or a list), for the error naming one that does not decode."""
        return [self.samples[i][0] for i in torch.as_tensor(indices).tolist()]

    def __getitem__(self, key):
        train = isinstance(key, Item)
        index = key.index if train else int(key)
        data, label, _ = super().__getitem__(index)
        if self.on_gpu:  # the crop is drawn here from the file's header: the main process only decodes
            row = jpeg.describe_file(data, self.seed, key.epoch, index) if train else jpeg.describe_file(data)
            return (data, row), label, key, 0
        (image,), fallbacks = jpeg.decode_batch([data], "cpu", names=[self.samples[index][0]])
        if train:
            boxes, flips = crops.random_resized_crop_boxes([image.shape[-2]], [image.shape[-1]], self.seed,
                                                          key.epoch, [index])
            x = crops.flip_(crops.resized_crops([image], boxes, TRAIN_SIZE), flips)[0]
        else:
            x = crops.center_crops([image], EVAL_RESIZE, TRAIN_SIZE)[0]
        if self.normalize:
            x = crops.normalize_to(x[None], channels_last=False)[0]
        return x, label, key, fallbacks


def collate_items(items):
    """A batch of :class:`JpegFolderSet` items: the data (uint8 [B, 3, H, W], or the files as a
    :class:`kcd_fast.jpeg.EncodedBatch`),
    int64 labels and indices [B]; for :class:`Item` keys also the epoch, the count of own rows (first),
    and the K1L rows, their partners' rows (int64 [P]) and ratios (float32 [P]); last, the count of
    files the workers decoded through PIL."""
    data, labels, keys, fallbacks = zip(*items)
    # default_collate stacks straight into shared memory in a worker: the batch then reaches the main
    # process without the copy a plain torch.stack would cost there
    x = default_collate(list(data)) if isinstance(data[0], torch.Tensor) else jpeg.EncodedBatch.pack(*zip(*data))
    labels = torch.tensor(labels, dtype=torch.int64)
    if not isinstance(keys[0], Item):
        return x, labels, torch.tensor(keys, dtype=torch.int64), sum(fallbacks)
    rows = [r for r, k in enumerate(keys) if k.partner_row >= 0]
    return (x, labels, torch.tensor([k.index for k in keys], dtype=torch.int64), keys[0].epoch,
            sum(k.own for k in keys), torch.tensor(rows, dtype=torch.int64),
            torch.tensor([keys[r].partner_row for r in rows], dtype=torch.int64),
            torch.tensor([keys[r].eps for r in rows], dtype=torch.float32), sum(fallbacks))


def to_input(dataset: JpegFolderSet, data, index, device, dtype, epoch=None) -> tuple[torch.Tensor, int]:
    """A collated batch's images as the network's input on ``device``: normalised, in ``dtype``,
    channels-last on CUDA; and the count of files decoded through PIL here. Bytes
    (``dataset.on_gpu``) are decoded there, train crops drawn for ``epoch`` (None: the evaluation
    transform); uint8 crops are moved and normalised (crops normalised by the workers: moved, cast)."""
    if dataset.on_gpu:
        names = dataset.paths(index)
        if epoch is None:
            return jpeg.eval_batch(data, device, dtype, EVAL_RESIZE, TRAIN_SIZE, names=names)
        return jpeg.train_batch(data, index, dataset.seed, epoch, device, dtype, TRAIN_SIZE, names=names)
    channels_last = device.type == "cuda"
    if dataset.normalize:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return data.to(device, dtype=dtype, memory_format=fmt, non_blocking=True), 0
    return crops.normalize_to(data.to(device, non_blocking=True), dtype=dtype, channels_last=channels_last), 0


class TrainBatches:
    """The epoch's ``(x, y, index)`` batches from a DataLoader over :class:`PartnerBatches`: the inputs
    normalised on the device in the AMP dtype, each K1L row mixed with its partner's row in float32
    (:func:`kcd_fast.sampling.mix_inputs`), and only the batch's own rows kept. Files that only PIL
    decodes (CMYK on the GPU, data that is not a JPEG) are counted in ``fallbacks`` and, on rank 0,
    reported once an epoch. ``ahead``: the batches a thread holds ready (:func:`kcd_fast.train.prefetch.prepared`;
    None: 2 on CUDA, 0 on the CPU)."""

    def __init__(self, loader: DataLoader, dataset: JpegFolderSet, device, dtype: torch.dtype, rank: int = 0,
                 ahead=None):
        self.loader, self.dataset = loader, dataset
        self.device, self.dtype, self.rank = torch.device(device), dtype, rank
        self.ahead = prefetch.default_ahead(self.device) if ahead is None else ahead
        self.fallbacks, self.epoch = 0, None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.fallbacks = 0
        # Each batch's decode, crops and mix are queued on a side stream, beside the step already queued
        # (as timm's PrefetchLoader and DALI run their input work), not after it; on CUDA a thread
        # prepares them ahead (kcd_fast.train.prefetch).
        yield from prefetch.prepared(self.loader, self.prepare, self.device, self.ahead)
        if self.fallbacks and self.rank == 0:
            where = "the GPU's decoder" if self.dataset.on_gpu else "decode_jpeg"
            print(f"kcd_fast: epoch {self.epoch + 1}: {self.fallbacks} file(s) of this process's share were decoded "
                  f"by PIL on the CPU ({where} does not read them: CMYK, or not JPEG data)", flush=True)

    def prepare(self, data, y, index, epoch, own, k1l, partner_rows, eps, fallbacks=0):
        """One collated batch (:func:`collate_items`) -> ``(x, y, index)`` of its own rows."""
        self.epoch = epoch
        if not k1l.numel():  # the row count is host metadata: no sync
            x, here = to_input(self.dataset, data, index, self.device, self.dtype, epoch)
            self.fallbacks += fallbacks + here
            return x, y, index
        x, here = to_input(self.dataset, data, index, self.device, torch.float32, epoch)
        self.fallbacks += fallbacks + here
        k1l, partner_rows, eps = (t.to(self.device, non_blocking=True) for t in (k1l, partner_rows, eps))
        x[k1l] = mix_inputs(x[k1l], x[partner_rows], eps)
        return x[:own].to(self.dtype), y[:own], index[:own]


def folder_samples(dataset) -> list:
    """The (path, label) pairs of an ImageFolder, or of a Subset of one (``--train-subset``), in order."""
    if isinstance(dataset, Subset):
        base = folder_samples(dataset.dataset)
        return [base[i] for i in dataset.indices]
    return list(dataset.samples)


def amp_dtype(cfg) -> torch.dtype:
    return AMP_DTYPES[cfg.amp] or torch.float32


class JpegSplit:
    """A folder split read with the evaluation transform by ``--loader cpu``/``gpu``: what
    :func:`kcd_fast.train.engine.evaluate` scores and the one-off knowledge fill
    (:meth:`kcd_fast.KnowledgeBuffer.fill_from`) reads, through :meth:`batches` (``len`` is its sample
    count)."""

    def __init__(self, dataset, cfg):
        self.dataset = JpegFolderSet(folder_samples(dataset), cfg.loader == "gpu", cfg.seed,
                                     normalize=torch.device(cfg.device).type == "cpu")
        self.workers = cfg.workers

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, indices, cfg, device):
        """``(x, y, index)`` over ``indices`` in batches of ``--eval-batch-size``, x on ``device``."""
        device, dtype = torch.device(device), amp_dtype(cfg)
        loader = DataLoader(self.dataset, sampler=list(indices), batch_size=cfg.eval_batch_size,
                            num_workers=self.workers, collate_fn=collate_items,
                            pin_memory=device.type == "cuda" and not self.dataset.on_gpu)

        def eval_input(data, y, index, fallbacks):
            return to_input(self.dataset, data, index, device, dtype)[0], y, index

        yield from prefetch.prepared(loader, eval_input, device, prefetch.default_ahead(device))


def train_loader(cfg, data, condenser, mix: bool):
    """The epoch loader over ``data.train`` (a folder split): over the condenser's sampler with its K1L
    partners appended when ``mix``, or a DistributedSampler over every sample without a condenser.
    Returns (batches, sampler, generator), as :func:`kcd_fast.train.loaders.train_loader`."""
    # On a CPU-only run the workers normalise too: the main process, which trains, has no device to
    # hand it to (on a GPU host uint8 leaves the workers and the device normalises).
    dataset = JpegFolderSet(folder_samples(data.train), cfg.loader == "gpu", cfg.seed,
                            normalize=torch.device(cfg.device).type == "cpu")
    partner = eps = None
    if condenser is not None:
        sampler = condenser.sampler()
        if mix:
            partner, eps = condenser.host_partner, condenser.host_eps
    else:
        sampler = DistributedSampler(dataset, num_replicas=cfg.world_size, rank=cfg.rank, shuffle=True, seed=cfg.seed)
    generator = torch.Generator()  # seeds the workers' RNGs, which the crops do not use
    device = torch.device(cfg.device)
    loader = DataLoader(dataset, batch_sampler=PartnerBatches(sampler, cfg.batch_size // cfg.world_size, partner, eps),
                        num_workers=cfg.workers, collate_fn=collate_items, generator=generator,
                        pin_memory=device.type == "cuda" and not dataset.on_gpu, persistent_workers=cfg.workers > 0)
    return TrainBatches(loader, dataset, device, amp_dtype(cfg), cfg.rank), sampler, generator
