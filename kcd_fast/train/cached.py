"""``--knowledge cached`` in the trainer: the soft-label buffer opened from a file or a resumed run's
state, or made empty and filled by the teacher (in the first epoch, or by a one-off pass), then
completed across ranks and saved."""
from __future__ import annotations

import os
import time

import torch

from kcd_fast.files import file_hash
from kcd_fast.knowledge import KnowledgeBuffer, KnowledgeFileError
from kcd_fast.train import distributed
from kcd_fast.train.config import UserError
from kcd_fast.train.options import AMP_DTYPES
from kcd_fast.train.progress import track


def _buffer_settings(cfg) -> dict:
    return dict(temperature=cfg.kd_temperature, storage=cfg.storage, dtype=getattr(torch, cfg.knowledge_dtype))


def _load(path, what: str, cfg, n: int, num_classes: int, samples: str, teacher_hash=None) -> KnowledgeBuffer:
    """A filled knowledge file for this run (its N, C, temperature, storage, k, dtype, teacher name and
    samples; the teacher's weights hash where given), or a one-line UserError saying why not."""
    try:
        if teacher_hash and not KnowledgeBuffer.read_header(path)["teacher_hash"]:
            raise KnowledgeFileError(f"{path} was made by a teacher trained here (it records no weights file), but "
                                     f"this run names --teacher-weights {cfg.teacher_weights}; leave that out to "
                                     f"use the file's knowledge, or fill a new file from those weights")
        knowledge = KnowledgeBuffer.load(path, device=cfg.device, num_samples=n, num_classes=num_classes,
                                         k=cfg.topk if cfg.storage == "topk" else None, teacher_hash=teacher_hash,
                                         teacher=cfg.teacher, samples=samples, **_buffer_settings(cfg))
    except (KnowledgeFileError, MemoryError, FileNotFoundError) as exc:
        raise UserError(f"{what}: {exc}") from None
    if not knowledge.fully_filled():
        raise UserError(f"{what} holds only {int(knowledge.filled.sum())} of {n} samples")
    return knowledge


def open_buffer(cfg, data, samples: str, state_file) -> tuple[KnowledgeBuffer | None, bool]:
    """The run's knowledge buffer and whether it came filled: a resumed run's saved state
    (``state_file``), else a filled ``--knowledge-file`` (the teacher is then not needed at all),
    else an empty buffer for the teacher to fill. (None, False) with online knowledge."""
    if cfg.knowledge != "cached":
        return None, False
    if state_file is not None:
        return _load(state_file, f"--resume: the knowledge state {state_file}", cfg, data.n, data.num_classes,
                     samples), True
    if cfg.knowledge_file and os.path.isfile(cfg.knowledge_file):
        return _load(cfg.knowledge_file, f"--knowledge-file {cfg.knowledge_file}", cfg, data.n, data.num_classes,
                     samples, teacher_hash=file_hash(cfg.teacher_weights)), True
    if cfg.condensed and cfg.knowledge_fill == "lazy":
        raise UserError("--knowledge cached with --condensed trains on a subset from the first epoch, so the lazy "
                        "fill cannot see every sample: add --knowledge-fill pass or a filled --knowledge-file")
    try:
        return KnowledgeBuffer(data.n, data.num_classes, k=cfg.topk, device=cfg.device, teacher=cfg.teacher,
                               samples=samples, **_buffer_settings(cfg)), False
    except (ValueError, TypeError, MemoryError) as exc:
        raise UserError(f"--knowledge cached: {exc}") from None


def finish_fill(knowledge: KnowledgeBuffer, cfg, teacher_hash: str, owner) -> None:
    """After each rank filled its share: one collective completes every replica; the file is saved.
    ``owner()`` gives the rank that filled each sample; it is worked out under DDP only (for the lazy
    fill it walks the epoch's sampler of every rank)."""
    if cfg.distributed:
        knowledge.complete_ranks(owner(), cfg.rank)
    if not knowledge.fully_filled():
        raise RuntimeError(f"the knowledge buffer holds {int(knowledge.filled.sum())} of {knowledge.num_samples} "
                           f"samples after the fill")
    if cfg.knowledge_file and distributed.is_main(cfg):
        # The weights file's hash ("" for a teacher trained here).
        knowledge.save(cfg.knowledge_file, teacher_hash=teacher_hash if cfg.teacher_weights else "")


def fill_by_pass(knowledge: KnowledgeBuffer, teacher, data, cfg, teacher_hash: str) -> tuple[int, float]:
    """``--knowledge-fill pass``: the teacher runs once over the training samples with the evaluation
    transform, each rank over its share, then the replicas are completed. Returns the teacher forwards
    of all ranks and the time it took (outside every epoch's train time)."""
    t_fill = time.time()
    n, world = data.n, cfg.world_size

    def progress(batches):
        return track(batches, cfg, "knowledge fill", n, ranks=world)

    if hasattr(data.train_eval, "batches"):  # --loader cpu/gpu: the folder's own batches of JPEGs
        batches = data.train_eval.batches(range(cfg.rank, n, world), cfg, cfg.device)
        mine = knowledge.fill_from(teacher, ((x, index) for x, _, index in progress(batches)), device=cfg.device,
                                   autocast_dtype=AMP_DTYPES[cfg.amp])
    else:
        mine = knowledge.fill(teacher, data.train_eval, batch_size=cfg.eval_batch_size, device=cfg.device,
                              num_workers=0 if data.resident is not None else cfg.workers,
                              indices=range(cfg.rank, n, world), autocast_dtype=AMP_DTYPES[cfg.amp], progress=progress)
    # This rank's forwards and the other ranks' shares (of known size: together, every sample once).
    forwards = mine + sum(len(range(r, n, world)) for r in range(world) if r != cfg.rank)
    finish_fill(knowledge, cfg, teacher_hash, owner=lambda: torch.arange(n) % world)
    if str(cfg.device).startswith("cuda"):
        torch.cuda.synchronize(cfg.device)
    elapsed = time.time() - t_fill
    if distributed.is_main(cfg):
        print(f"kcd_fast: knowledge filled by a one-off teacher pass over {n} samples in {elapsed:.1f}s", flush=True)
    return forwards, elapsed
