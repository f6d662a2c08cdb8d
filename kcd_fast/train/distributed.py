"""This process's place in a torchrun job (env://), and the few collectives the trainer runs."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from kcd_fast.train.config import Config, UserError


def setup(cfg: Config) -> Config:
    """``cfg`` with this process's ``rank``, ``world_size``, ``local_rank``, ``distributed`` and its
    ``device`` ("cuda:<local rank>" for cuda), from torchrun's RANK/WORLD_SIZE/LOCAL_RANK (one
    process without them); joins the process group (nccl on CUDA, gloo on the CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    name = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda or cuda:<index>") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: the trainer runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was asked for, but no CUDA GPU is available")
        if device.index is not None and not device.index < torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        name = f"cuda:{local_rank}"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if name.startswith("cuda") else "gloo", init_method="env://")
    if cfg.batch_size % world_size:
        raise UserError(f"--batch-size ({cfg.batch_size}) must be divisible by the number of processes "
                        f"({world_size})")
    return cfg.replace(rank=rank, world_size=world_size, local_rank=local_rank, distributed=world_size > 1,
                       device=name)


def is_main(cfg) -> bool:
    return cfg.rank == 0


def all_reduce_sum(t: torch.Tensor, cfg) -> torch.Tensor:
    if cfg.distributed:
        dist.all_reduce(t)
    return t


def barrier(cfg) -> None:
    if cfg.distributed:
        dist.barrier()


@contextlib.contextmanager
def main_first(cfg, when: bool = True):
    """Rank 0 runs the block while the other ranks wait; then they run it (e.g. rank 0 downloads
    and unpacks, the others only read). Every rank passes the one barrier, also when rank 0's block
    raises."""
    first = when and cfg.distributed
    if first and not is_main(cfg):
        dist.barrier()
    try:
        yield
    finally:
        if first and is_main(cfg):
            dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
