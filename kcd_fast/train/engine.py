"""One training epoch (the M-step, Eq. 11, with the OGVE record of Eq. 12) and one evaluation, as
torchvision's reference trainer has them; the learning-rate schedule and the autocast they use."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from kcd_fast import distill
from kcd_fast.distillers import Batch
from kcd_fast.train.options import AMP_DTYPES
from kcd_fast.train.distillation import FeatureDistill
from kcd_fast.train.distributed import all_reduce_sum
from kcd_fast.train.progress import track


def autocast(cfg):
    """``--amp``'s autocast on the run's device type (a no-op with ``--amp off``)."""
    dtype = AMP_DTYPES[cfg.amp]
    device_type = "cuda" if str(cfg.device).startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def build_scheduler(optimizer, cfg) -> torch.optim.lr_scheduler.LRScheduler:
    """The student's learning rate per epoch (``scheduler.step()`` once an epoch, as the paper's
    and torchvision's references do): ``--lr-warmup-epochs`` of linear warm-up, then MultiStepLR
    at the absolute epochs ``--lr-milestones`` or a cosine decay to ``--lr-min`` by the last epoch."""
    lr_sched = torch.optim.lr_scheduler
    warm = cfg.lr_warmup_epochs
    if cfg.lr_scheduler == "cosine":
        main_sched = lr_sched.CosineAnnealingLR(optimizer, T_max=cfg.epochs - warm, eta_min=cfg.lr_min)
    else:  # the milestones count from the first epoch, warm-up included
        main_sched = lr_sched.MultiStepLR(optimizer, milestones=[m - warm for m in cfg.lr_milestones],
                                          gamma=cfg.lr_gamma)
    if not warm:
        return main_sched
    warmup = lr_sched.LinearLR(optimizer, start_factor=cfg.lr_warmup_decay, total_iters=warm)
    return lr_sched.SequentialLR(optimizer, [warmup, main_sched], milestones=[warm])


class Distiller:
    """The ``--distill`` loss with its settings, read from the config once: the loss on teacher
    logits, and, where the loss registers one, its variant that reads a knowledge buffer itself
    (``kd``: on CUDA one fused kernel reads the dense buffer's rows in place)."""

    def __init__(self, cfg):
        self.name = cfg.distill
        self.settings = distill.loss_settings(cfg.distill, cfg)
        self.on_logits = distill.LOSSES[cfg.distill]
        self.on_buffer = distill.KNOWLEDGE_LOSSES.get(cfg.distill)

    def __call__(self, student_logits, teacher_logits, target, epoch):
        return self.on_logits(student_logits, teacher_logits, target, self.settings, epoch)

    def from_buffer(self, student_logits, knowledge, index, target, epoch):
        """The loss on the soft labels of ``knowledge`` at ``index``: the loss's own buffer variant, or
        the loss on the logits that reproduce the stored soft labels."""
        if self.on_buffer is not None:
            return self.on_buffer(student_logits, knowledge, index, target, self.settings, epoch)
        return self(student_logits, knowledge.teacher_logits(index), target, epoch)


def train_one_epoch(student, teacher, loader, optimizer, scaler, condenser, cfg, epoch, device, total_images,
                    knowledge=None, fill=False, loss=None):
    """One M-step epoch (Eq. 11) over the condensed set; OGVE recording per batch (Eq. 12).

    The teacher's knowledge comes from the teacher itself (``knowledge`` None), from it while
    filling the buffer (``fill``), or from the buffer alone. ``loss``: a :class:`Distiller` (built
    from ``cfg`` when None), or a :class:`FeatureDistill`, whose module (``student``: it, or its DDP
    wrap) runs the student and the distiller together. No host synchronisation per step: the loss
    is accumulated on the device and read once. Returns the epoch's mean loss, the samples passed
    and the images the teacher ran on (and a feature distiller's epoch means of its logged terms).
    """
    student.train()
    if teacher is not None:
        teacher.eval()
    loss_fn = loss if loss is not None else Distiller(cfg)
    feature = isinstance(loss_fn, FeatureDistill)
    from_buffer = knowledge is not None and not fill
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen, forwards = 0, 0
    # the views both networks run on (SSKD: rotated copies of the mixed inputs)
    views = loss_fn.views if feature else None
    for x, y, index in track(loader, cfg, f"epoch {epoch + 1}/{cfg.epochs}", total_images, cfg.world_size):
        x, y = _on_device(x, y, device, views)
        index_on_device = index.to(device, non_blocking=True) if feature or condenser is not None else None
        with autocast(cfg):
            if not from_buffer:
                with torch.no_grad():
                    t_logits = teacher(x)
                forwards += y.shape[0]
                if fill:
                    knowledge.write(index, t_logits)
            if feature:
                s_logits, step_loss = loss_fn.step(student, x, t_logits, y, index_on_device, epoch)
            else:
                s_logits = student(x)
                step_loss = (loss_fn.from_buffer(s_logits, knowledge, index, y, epoch) if from_buffer
                             else loss_fn(s_logits, t_logits, y, epoch))
        _step(optimizer, scaler, step_loss)
        if condenser is not None:
            condenser.observe(index_on_device, s_logits.detach())
        loss_sum.add_(step_loss.detach(), alpha=y.shape[0])  # one kernel: in float64, as loss_sum is
        seen += y.shape[0]
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)]),
                            cfg)
    stats = {"loss": float(totals[0] / totals[1].clamp_min(1)), "samples": int(totals[1]),
             "teacher_forwards": forwards * cfg.world_size}
    if feature:
        stats["distiller"] = loss_fn.epoch_logs(seen)
    return stats


def teacher_phase_epoch(feature: FeatureDistill, teacher, loader, optimizer, scaler, cfg, epoch: int,
                        device, total_images: int) -> dict[str, float]:
    """One epoch of a feature distiller's teacher phase (SSKD's head): the frozen teacher runs on each
    batch's views, the distiller's teacher-side parts learn from ``teacher_phase_loss``; under DDP their
    gradients are averaged over the ranks. Returns this process's epoch means of the logged terms."""
    distiller = feature.distiller
    params = [p for group in optimizer.param_groups for p in group["params"]]
    average = (lambda: _average_gradients(params, cfg)) if cfg.distributed else None
    seen = 0
    desc = f"{feature.name} teacher phase {epoch + 1}/{distiller.teacher_phase_epochs}"
    for x, y, index in track(loader, cfg, desc, total_images, cfg.world_size):
        x, y = _on_device(x, y, device, distiller.views)
        with autocast(cfg):
            with torch.no_grad():
                logits = teacher(x)
            taps = feature.teacher_taps.values if feature.teacher_taps is not None else {}
            loss, logs = distiller.teacher_phase_loss({"logits": logits, **taps},
                                                      Batch(y, index.to(device, non_blocking=True), epoch))
        _step(optimizer, scaler, loss, average)
        feature.add_logs(logs, y.shape[0])
        seen += y.shape[0]
    return feature.epoch_logs(seen)


def _average_gradients(params, cfg) -> None:
    """The gradients of ``params`` averaged over the ranks: one all_reduce of their concatenation."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), cfg).div_(cfg.world_size)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def _on_device(x, y, device, views=None):
    """A batch's inputs and labels on ``device``: the inputs made into ``views`` (when given) there, and
    channels-last on CUDA, as the convolutions under AMP prefer."""
    x = x.to(device, non_blocking=True)
    if views is not None:
        x = views(x)
    if str(device).startswith("cuda"):
        x = x.to(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _step(optimizer, scaler, loss, before_step=None) -> None:
    """Backward and one optimizer step (through fp16's GradScaler when there is one); ``before_step``,
    if given, runs between the two (e.g. averaging gradients over the ranks)."""
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if before_step is not None:
        before_step()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


@torch.no_grad()
def evaluate(model, dataset, cfg, device, *, local: bool = False) -> dict:
    """Top-1/top-5 accuracy and loss over ``dataset``, exact under DDP (disjoint shares, summed).

    ``dataset``: a map-style dataset of (x, y), or an (x, y) pair of tensors resident on the device.
    ``local``: this process alone scores the whole of ``dataset``, with no collective (the teacher
    that rank 0 trains while the other ranks wait)."""
    model.eval()
    rank, world = (0, 1) if local else (cfg.rank, cfg.world_size)
    if isinstance(dataset, tuple):
        x_all, y_all = dataset
        share = torch.arange(rank, len(y_all), world, device=y_all.device)
        loader = ((x_all[i], y_all[i]) for i in share.split(cfg.eval_batch_size))
        total = len(y_all)
    elif hasattr(dataset, "batches"):  # a JPEG folder of --loader cpu/gpu: batches arrive on the device
        loader = ((x, y) for x, y, _ in dataset.batches(range(rank, len(dataset), world), cfg, device))
        total = len(dataset)
    else:
        data = Subset(dataset, list(range(rank, len(dataset), world))) if world > 1 else dataset
        loader = DataLoader(data, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.workers)
        total = len(dataset)
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for x, y in track(loader, cfg, "eval", total, ranks=world):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(cfg):
            logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        stats[:3] += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), hit[:, 0].sum().double(),
                                  hit.any(dim=1).sum().double()])
        stats[3] += len(y)  # a host number: no copy to the device that would wait for the queued work
    if not local:
        stats = all_reduce_sum(stats, cfg)
    n = max(float(stats[3]), 1.0)
    return {"loss": float(stats[0]) / n, "top1": 100.0 * float(stats[1]) / n, "top5": 100.0 * float(stats[2]) / n}
