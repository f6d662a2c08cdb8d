"""The run: :func:`main` as a list of named steps, :func:`test_only`, and :func:`cli`, which turns
each expected way to stop into one line and an exit code."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kcd_fast import official
from kcd_fast.condenser import KnowledgeCondenser, measured_cost
from kcd_fast.data import CorruptImageError, DatasetNotFoundError, build_datasets
from kcd_fast.files import file_hash
from kcd_fast.models import build_model
from kcd_fast.train import cached, checkpoint, config, distillation, distributed, engine, loaders, options, outputs
from kcd_fast.train import teacher as teachers
from kcd_fast.train.config import UserError
from kcd_fast.train.outputs import RunStatus


@dataclass
class Run:
    """Everything one training run holds between its steps."""

    cfg: config.Config
    data: loaders.TrainData
    out: Path
    status: RunStatus
    t_start: float
    condenser: KnowledgeCondenser | None = None
    knowledge: object = None
    teacher: torch.nn.Module | None = None
    teacher_hash: str = ""
    teacher_score: dict | None = None
    samples: str = ""
    student: torch.nn.Module | None = None
    model: torch.nn.Module | None = None  # the student, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    scaler: object = None
    loss: engine.Distiller | distillation.FeatureDistill | None = None  # --distill
    loader: object = None
    sampler: object = None
    loader_gen: torch.Generator | None = None
    writer: object = None
    start_epoch: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"top1": -1.0, "top5": -1.0, "epoch": -1})
    knowledge_state: str | None = None  # the buffer's state file as of the last checkpoint (cached mode)
    pixels: tuple | None = None  # --protocol official: (uint8 images, each sample's row), mixed in place
    pixels_state: str | None = None  # their state file as of the last checkpoint
    fill_forwards: int = 0
    fill_time: float = 0.0
    wall_before: float = 0.0
    forwards_total: int = 0

    @property
    def device(self) -> torch.device:
        return torch.device(self.cfg.device)


def main(args, status: RunStatus | None = None) -> dict:
    """Run the whole job from parsed arguments; returns the summary written to summary.json (or, with
    --test-only, the scores). Bad input raises :class:`UserError` before any work it would spoil."""
    t_start = time.time()
    status = status if status is not None else RunStatus()
    cfg = config.resolve(args)
    checkpoint.check_fresh_output_dir(cfg)
    cfg = distributed.setup(cfg)
    ckpt = checkpoint.read_for_resume(cfg) if cfg.resume else None
    outputs.print_notes(cfg)
    torch.manual_seed(cfg.seed)
    bundle = load_datasets(cfg)
    if cfg.test_only:
        return test_only(cfg, bundle)
    out = outputs.make_output_dir(cfg, status)  # only once the run's input is known to be good
    run = Run(cfg, loaders.train_data(cfg, bundle), out, status, t_start)
    run.condenser = build_condenser(cfg, run.data.n)  # before the teacher: bad settings cost no teacher training
    check_distiller(cfg, run.data)
    open_knowledge(run, ckpt)
    setup_teacher(run, ckpt)
    setup_student(run)
    restore(run, ckpt)
    start_outputs(run)
    fill_knowledge_once(run)
    run_teacher_phase(run)
    for epoch in range(run.start_epoch, cfg.epochs):
        run_epoch(run, epoch)
    return finish(run)


def load_datasets(cfg):
    """The dataset's train and val splits; with --download under torchrun rank 0 downloads and
    unpacks while the others wait, then they read its files."""
    with distributed.main_first(cfg, when=cfg.download):
        try:
            return build_datasets(cfg.dataset, cfg.data_dir, download=cfg.download and distributed.is_main(cfg),
                                  fake_size=cfg.fake_size, fake_val_size=cfg.fake_val_size,
                                  fake_image_size=cfg.fake_image_size, fake_num_classes=cfg.fake_num_classes,
                                  seed=cfg.seed)
        except (DatasetNotFoundError, ValueError, OSError, EOFError) as exc:  # missing, mismatched or corrupt data
            raise UserError(f"--dataset {cfg.dataset}: {exc}") from None


def build_condenser(cfg, n: int) -> KnowledgeCondenser | None:
    """The KCD stage loop over the N training samples (one stage on a fixed --condensed set)."""
    if not cfg.kcd:
        return None
    try:
        settings = dict(schedule=cfg.schedule, k0=cfg.k0, online_recording=cfg.online_recording,
                        adaptive_eps=cfg.adaptive_eps, protocol="paper")
        if cfg.protocol == "official" and not cfg.condensed:
            settings = _OFFICIAL_DEFAULTS
        condenser = KnowledgeCondenser(
            n, epochs=cfg.epochs, stage_epochs=cfg.epochs if cfg.condensed else cfg.stage_epochs, rho=cfg.rho,
            alpha=cfg.alpha, eps_max=cfg.eps_max, selection=cfg.selection, vaks=cfg.vaks,
            temperature=cfg.entropy_temperature, device=cfg.device, seed=cfg.seed, **settings)
        if cfg.condensed:
            condenser.load_condensed(cfg.condensed)
    except (ValueError, TypeError) as exc:
        where = (f"--condensed {cfg.condensed}" if cfg.condensed else
                 f"KCD with --rho {cfg.rho}, --epochs {cfg.epochs}, --stage-epochs {cfg.stage_epochs} on {n} "
                 f"training samples{' (--train-subset)' if cfg.train_subset else ''}")
        raise UserError(f"{where}: {exc}") from None
    return condenser


# --protocol official makes its own schedule, record, pairs and eps (the options are named as ignored).
_OFFICIAL_DEFAULTS = dict(protocol="official", schedule="exp", k0="dropped", online_recording=True, adaptive_eps=True)


def check_distiller(cfg, data: loaders.TrainData) -> None:
    """A feature distiller is built once for --teacher and --student before any teacher is trained:
    taps an architecture lacks and shapes no connector bridges stop the run here, naming the option.
    The build is dry, on the meta device: shapes only, no weights drawn and no memory taken (CRD's
    banks at ImageNet's N are 1.3 GB)."""
    if cfg.distill in options.feature_distillers():
        shape = image_shape(data)  # read outside: the dataset's transforms make real tensors
        with torch.device("meta"):
            build_feature_distill(cfg, data, build_model(cfg.student, data.num_classes, data.in_channels),
                                  build_model(cfg.teacher, data.num_classes, data.in_channels), shape)


def image_shape(data: loaders.TrainData) -> torch.Size:
    """The shape of one training input."""
    return (data.resident[0][0] if data.resident is not None else data.train[0][0]).shape


def build_feature_distill(cfg, data: loaders.TrainData, student, teacher, shape=None) -> distillation.FeatureDistill:
    """The feature distiller for ``student`` and ``teacher``, its shapes probed on a batch of zeros of the
    training images' ``shape`` (default: read from ``data``), on the student's device;
    :class:`UserError` naming --distill, --student or --teacher if it cannot be."""
    shape = image_shape(data) if shape is None else shape
    device = next(student.parameters()).device
    sample = torch.zeros((2, *shape), dtype=torch.float32, device=device)
    try:
        return distillation.FeatureDistill(cfg, student, teacher, sample, num_samples=data.n,
                                           num_classes=data.num_classes)
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None


def open_knowledge(run: Run, ckpt) -> None:
    """Which samples the run's indices name (checked against a resumed checkpoint's), and with
    --knowledge cached the soft-label buffer: a resumed run's state, a filled --knowledge-file, or empty."""
    run.samples = checkpoint.samples_id(run.cfg, run.data.train)
    checkpoint.check_same_samples(ckpt, run.samples, run.cfg)
    run.knowledge_state = ckpt["knowledge_state"] if ckpt is not None else None
    state_file = run.out / run.knowledge_state if run.cfg.knowledge == "cached" and run.knowledge_state else None
    run.knowledge, filled = cached.open_buffer(run.cfg, run.data, run.samples, state_file)
    if run.cfg.distill not in options.feature_distillers():  # a feature distiller is built with the student
        run.loss = engine.Distiller(run.cfg)
    if filled:  # the teacher is not needed at all; a resume keeps the hash its checkpoint recorded
        run.teacher_hash = ckpt["args"]["teacher_hash"] if ckpt is not None else ""
        run.teacher_score = ckpt["teacher_score"] if ckpt is not None else None


def setup_teacher(run: Run, ckpt) -> None:
    """The teacher, unless a filled buffer replaces it: given weights, or trained here for the small
    datasets; checked against a resumed run's by content, and (from a file, online) scored once."""
    cfg = run.cfg
    if run.knowledge is not None and run.knowledge.fully_filled():
        return
    if cfg.teacher_weights:
        run.teacher, teacher_file = teachers.load_teacher(cfg, run.data), cfg.teacher_weights
    else:  # the options' checks refused the datasets without a trainable teacher
        run.teacher, teacher_file = teachers.train_teacher(cfg, run.data)
    run.teacher_hash = file_hash(teacher_file)
    checkpoint.check_same_teacher(ckpt, run.teacher_hash, teacher_file, cfg)
    run.teacher.eval().requires_grad_(False)
    if run.device.type == "cuda":
        run.teacher = run.teacher.to(memory_format=torch.channels_last)
    # A teacher from a file is scored once, as CRD's and mdistiller's trainers do at the start (one
    # validation pass; a resume reads the score from its checkpoint).
    run.teacher_score = ckpt["teacher_score"] if ckpt is not None else None
    eval_teacher = cfg.knowledge == "online" if cfg.eval_teacher is None else cfg.eval_teacher
    if cfg.teacher_weights and run.teacher_score is None and eval_teacher:
        run.teacher_score = engine.evaluate(run.teacher, run.data.val, cfg, run.device)
        if distributed.is_main(cfg):
            print(f"kcd_fast: teacher {cfg.teacher} ({cfg.teacher_weights}): top-1 {run.teacher_score['top1']:.2f}%, "
                  f"top-5 {run.teacher_score['top5']:.2f}% on the validation set", flush=True)


def setup_student(run: Run) -> None:
    """The student (seeded), its DDP wrap under torchrun, SGD, the schedule, fp16's GradScaler, and
    the loader over the condensed set (VAKS on the inputs unless the soft labels are cached)."""
    cfg, device = run.cfg, run.device
    torch.manual_seed(cfg.seed)
    run.student = build_model(cfg.student, run.data.num_classes, run.data.in_channels).to(device)
    if device.type == "cuda":
        run.student = run.student.to(memory_format=torch.channels_last)
    run.model = run.student
    if cfg.distill in options.feature_distillers():  # the student and the distiller's parts: one module
        run.loss = build_feature_distill(cfg, run.data, run.student, run.teacher)
        run.model = run.loss.module
        distillation.ignore_rank_synchronised_buffers(run.model)
    if cfg.distributed:
        run.model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.index is not None else None)
    run.optimizer = torch.optim.SGD(run.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
    run.scheduler = engine.build_scheduler(run.optimizer, cfg)
    run.scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    online_official = cfg.protocol == "official" and cfg.knowledge == "online" and cfg.kcd and not cfg.condensed
    run.pixels = loaders.pixel_buffer(run.data.train) if online_official else None
    if online_official and run.pixels is None and distributed.is_main(cfg):
        print(f"kcd_fast: note: --protocol official mixes pixels in place for the datasets held in memory; "
              f"{cfg.dataset}'s inputs are mixed per sample as with --protocol paper", flush=True)
    # VAKS on the inputs in the loader, unless the soft labels are cached or the official protocol mixes pixels.
    run.loader, run.sampler, run.loader_gen = loaders.train_loader(
        cfg, run.data, run.condenser, mix=cfg.knowledge != "cached" and run.pixels is None)


def restore(run: Run, ckpt) -> None:
    """A resumed run's student, optimizer, schedule, scaler, condenser and progress."""
    if ckpt is None:
        return
    run.student.load_state_dict(ckpt["model"])
    if isinstance(run.loss, distillation.FeatureDistill):
        run.loss.distiller.load_state_dict(ckpt["distiller"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["lr_scheduler"])
    if run.scaler is not None and ckpt["scaler"]:
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.condenser is not None:
        run.condenser.load_state_dict(ckpt["condenser"])
    run.start_epoch, run.history, run.best = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"]
    run.fill_forwards, run.fill_time, run.wall_before = ckpt["fill_forwards"], ckpt["fill_time_s"], ckpt["wall_time_s"]
    run.pixels_state = ckpt["pixels_state"]
    if run.pixels is not None and run.pixels_state:  # the pixels as mixed so far: the mixes compound
        run.pixels[0].copy_(torch.load(run.out / run.pixels_state, weights_only=True))
    run.status.checkpointed = True
    if distributed.is_main(run.cfg):
        print(f"kcd_fast: resumed from {run.out / 'checkpoint.pth'} after epoch {run.start_epoch}/{run.cfg.epochs}",
              flush=True)


def start_outputs(run: Run) -> None:
    """Every input is loaded (under DDP every rank has passed its checks: the student's wrap
    synchronised them): a finished run's outputs in the folder make way, and the run says what it is."""
    cfg = run.cfg
    if distributed.is_main(cfg):
        checkpoint.clear_previous_run(cfg)
    run.writer = outputs.tensorboard(run.out, cfg)
    run.forwards_total = run.fill_forwards + sum(h["teacher_forwards"] for h in run.history)
    if distributed.is_main(cfg):
        outputs.write_metrics(run.out, run.history)
        val = run.data.val
        num_val = len(val[1]) if isinstance(val, tuple) else len(val)
        print(f"kcd_fast: {cfg.dataset} ({run.data.n} train / {num_val} val, {run.data.num_classes} classes), "
              f"{cfg.teacher} -> {cfg.student}, {'KCD' if cfg.kcd else 'KD (no KCD)'}, {cfg.epochs} epochs, "
              f"device {run.device}, {cfg.world_size} process(es)", flush=True)


def fill_knowledge_once(run: Run) -> None:
    """--knowledge-fill pass: the one-off teacher pass with the evaluation transform, before the first
    epoch; the teacher is then dropped (not run again), so its GPU memory goes back at once."""
    if run.knowledge is None or run.knowledge.fully_filled() or run.cfg.knowledge_fill != "pass":
        return
    forwards, run.fill_time = cached.fill_by_pass(run.knowledge, run.teacher, run.data, run.cfg, run.teacher_hash)
    run.fill_forwards = forwards
    run.forwards_total += forwards
    run.teacher = None


def run_teacher_phase(run: Run) -> None:
    """A feature distiller's phase before the student's (SSKD: its teacher head), over every training
    sample with the training transform; skipped once done (a resumed run's distiller state says so; a
    run stopped during it has no checkpoint yet and starts again)."""
    feature, cfg = run.loss, run.cfg
    if not isinstance(feature, distillation.FeatureDistill) or not feature.distiller.teacher_phase_epochs:
        return
    distiller = feature.distiller
    if bool(distiller.teacher_phase_done):
        return
    optimizer, scheduler = distiller.teacher_phase_optimizer(cfg.momentum, cfg.weight_decay)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.requires_grad_(True)
    scaler = torch.amp.GradScaler(run.device.type) if cfg.amp == "fp16" else None
    loader, sampler, generator = loaders.train_loader(cfg, run.data, None, mix=False)
    epochs, t0 = distiller.teacher_phase_epochs, time.time()
    for epoch in range(epochs):
        torch.manual_seed(loaders.epoch_seed(cfg.seed, epoch, cfg.rank, "teacher_phase"))
        generator.manual_seed(loaders.epoch_seed(cfg.seed, epoch, cfg.rank, "teacher_phase_loader"))
        sampler.set_epoch(epoch)
        logs = engine.teacher_phase_epoch(feature, run.teacher, loader, optimizer, scaler, cfg, epoch, run.device,
                                          len(sampler) * cfg.world_size)
        scheduler.step()
        if distributed.is_main(cfg):
            shown = ", ".join(f"{key} {value:.4f}" for key, value in logs.items())
            print(f"kcd_fast: --distill {feature.name} teacher phase {epoch + 1}/{epochs}: {shown}, "
                  f"{time.time() - t0:.1f}s", flush=True)
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    distiller.teacher_phase_done.fill_(True)


def run_epoch(run: Run, epoch: int) -> None:
    """One epoch: the M-step, the stage end's E-step (Alg. 1), evaluation, the epoch's records."""
    cfg, n = run.cfg, run.data.n
    t0 = time.time()
    # Every source of randomness of an epoch derives from (seed, epoch, rank): a resumed run repeats it.
    torch.manual_seed(loaders.epoch_seed(cfg.seed, epoch, cfg.rank, "torch"))
    run.loader_gen.manual_seed(loaders.epoch_seed(cfg.seed, epoch, cfg.rank, "loader"))  # the workers' seeds
    run.sampler.set_epoch(epoch)
    kept_fraction = run.condenser.kept_indices().numel() / n if run.condenser is not None else 1.0
    fill = run.knowledge is not None and not run.knowledge.fully_filled()
    lr = run.optimizer.param_groups[0]["lr"]  # the rate this epoch trains at (scheduler.step() moves it on)
    t_train = time.time()
    stats = engine.train_one_epoch(run.model, run.teacher, run.loader, run.optimizer, run.scaler, run.condenser,
                                   cfg, epoch, run.device, len(run.sampler) * cfg.world_size,
                                   knowledge=run.knowledge, fill=fill, loss=run.loss)
    mstep_time = time.time() - t_train  # train_one_epoch ends in a host read of its loss: synchronised
    run.scheduler.step()
    if fill:  # the lazy fill: each rank wrote its own share of this first, full epoch
        cached.finish_fill(run.knowledge, cfg, run.teacher_hash,
                           owner=lambda: loaders.epoch_owner(run.sampler, cfg, epoch, n))
        run.teacher = None  # not run again: dropped, so its GPU memory goes back at once
    plan = end_stage(run, epoch)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    train_time = time.time() - t_train  # M-step and E-step (the checkpoint files are not counted)
    if run.knowledge is not None and (fill or (plan is not None and cfg.vaks)):
        run.knowledge_state = f"knowledge-state-e{epoch}.kcdk"
        if distributed.is_main(cfg):
            run.knowledge.save(run.out / run.knowledge_state)
    if run.pixels is not None and plan is not None and cfg.vaks:
        run.pixels_state = f"pixels-state-e{epoch}.pt"
        if distributed.is_main(cfg):
            checkpoint.save(run.pixels[0], run.out / run.pixels_state)
    val = engine.evaluate(run.student, run.data.val, cfg, run.device)
    run.forwards_total += stats["teacher_forwards"]
    passed = sum(h["samples"] for h in run.history) + stats["samples"]
    row = {"epoch": epoch, "lr": lr, "train_loss": stats["loss"], "val_loss": val["loss"], "top1": val["top1"],
           "top5": val["top5"], "samples": stats["samples"], "kept_fraction": kept_fraction,
           "C_so_far": measured_cost(passed, n, epoch + 1, cfg.world_size), "epoch_time": time.time() - t0,
           "train_time": train_time, "mstep_time": mstep_time, "estep_time": train_time - mstep_time,
           "condensed": plan is not None, "teacher_forwards": stats["teacher_forwards"]}
    if "distiller" in stats:  # a feature distiller's logged terms, this process's epoch means
        row["distiller"] = stats["distiller"]
    record_epoch(run, row, plan)


def end_stage(run: Run, epoch: int):
    """Alg. 1 lines 8-14 at a stage boundary (the condenser's E-step); with cached knowledge, VAKS then
    mixes the buffer's soft labels with the plan's pairs (Eq. 14). Returns the plan, or None."""
    plan = run.condenser.end_epoch(epoch) if run.condenser is not None else None
    if plan is None or not run.cfg.vaks or not plan.k1l.numel():
        return plan
    if run.knowledge is not None:
        run.knowledge.mix_(plan.k1l, plan.k0, plan.eps)
    elif run.pixels is not None:  # --protocol official: the pixels, in place, truncated (Eq. 14)
        images, rows = run.pixels
        official.mix_pixels_(images, rows[plan.k1l.cpu()], rows[plan.k0.cpu()], plan.eps.cpu())
    return plan


def record_epoch(run: Run, row: dict, plan) -> None:
    """The epoch's line, best student, checkpoint, metrics.jsonl and TensorBoard scalars (rank 0)."""
    cfg, epoch = run.cfg, row["epoch"]
    run.history.append(row)
    improved = row["top1"] > run.best["top1"]
    if improved:
        run.best = {"top1": row["top1"], "top5": row["top5"], "epoch": epoch}
    # Under DDP, every rank takes part in the condenser's state (it merges the ranks' records first).
    condenser_state = run.condenser.state_dict() if run.condenser is not None else None
    if distributed.is_main(cfg):
        stage_note = "" if plan is None else f", condensed to {plan.num_kept}/{run.data.n} (|K1L|={plan.k1l.numel()})"
        print(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, top-1 {row['top1']:.2f}%, "
              f"top-5 {row['top5']:.2f}%, samples {row['samples']}, C so far {row['C_so_far']:.3f}, "
              f"{row['epoch_time']:.1f}s{stage_note}", flush=True)
        if improved:  # before the checkpoint that records this best: a resume never lacks its file
            checkpoint.save(run.student.state_dict(), run.out / "student_best.pth")
        checkpoint.save({"model": run.student.state_dict(), "optimizer": run.optimizer.state_dict(),
                         "lr_scheduler": run.scheduler.state_dict(),
                         "scaler": run.scaler.state_dict() if run.scaler else None, "condenser": condenser_state,
                         "epoch": epoch, "history": run.history, "best": run.best,
                         "args": checkpoint.identity(cfg, run.teacher_hash), "knowledge_state": run.knowledge_state,
                         "fill_forwards": run.fill_forwards, "fill_time_s": run.fill_time,
                         "teacher_score": run.teacher_score, "samples": run.samples, "pixels_state": run.pixels_state,
                         "distiller": distiller_state(run),
                         "wall_time_s": run.wall_before + time.time() - run.t_start}, run.out / "checkpoint.pth")
        run.status.checkpointed = True
        checkpoint.drop_stale_states(run.out, keep=(run.knowledge_state, run.pixels_state), inputs=cfg.knowledge_file)
        outputs.write_metrics(run.out, run.history)
        if run.writer is not None:
            for key in ("train_loss", "val_loss", "top1", "top5", "kept_fraction", "C_so_far", "lr"):
                run.writer.add_scalar(key, row[key], epoch)
    distributed.barrier(cfg)


def distiller_state(run: Run) -> dict | None:
    """A feature distiller's state for the checkpoint (connectors, heads, memory banks), else None."""
    return run.loss.distiller.state_dict() if isinstance(run.loss, distillation.FeatureDistill) else None


def finish(run: Run) -> dict:
    """summary.json, the final student and condensed set, the plots; returns the summary."""
    cfg = run.cfg
    summary = outputs.summary(cfg, checkpoint.identity(cfg, run.teacher_hash), run.history, run.best, run.condenser,
                              run.data.n, run.wall_before + time.time() - run.t_start,
                              teacher_passes=run.forwards_total, knowledge=run.knowledge)
    summary["knowledge_fill_time_s"] = run.fill_time  # the one-off pass (--knowledge-fill pass), outside every epoch
    summary["teacher_score"] = run.teacher_score  # a --teacher-weights teacher's validation top-1/top-5/loss
    if distributed.is_main(cfg):
        outputs.write_final(run.out, cfg, run.student, run.condenser, summary, run.history, run.writer)
        print(f"kcd_fast: done in {summary['wall_time_s']:.1f}s: best top-1 {run.best['top1']:.2f}%, "
              f"final top-1 {summary['final_top1']:.2f}%, C {summary['C']:.3f}; outputs in {run.out}", flush=True)
    return summary


def test_only(cfg, bundle) -> dict:
    """``--test-only``: top-1, top-5 and loss of ``--teacher-weights`` (as ``--teacher``) and
    ``--student-weights`` (as ``--student``) on the validation set, with the evaluation transform,
    ``--amp`` and, under torchrun, every rank's share. Nothing is trained or written."""
    device = torch.device(cfg.device)
    val = bundle.val.materialize(device) if cfg.fake_on_device else bundle.val
    num_val = len(val[1]) if isinstance(val, tuple) else len(val)
    results = {"test_only": True, "dataset": cfg.dataset, "num_val": num_val}
    for role in ("teacher", "student"):
        path, arch = getattr(cfg, f"{role}_weights"), getattr(cfg, role)
        if not path:
            continue
        if role == "teacher":
            teachers.fetch_torchvision_weights(cfg, teachers.class_names(bundle))
        model = build_model(arch, bundle.num_classes, bundle.in_channels)
        teachers.load_weights(model, path, bundle.num_classes, f"--{role}-weights", arch=arch)
        model = model.to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        val_stats = engine.evaluate(model, loaders.eval_set(cfg, val), cfg, device)  # --loader cpu/gpu: JPEG batches
        results[role] = dict(val_stats, model=arch, weights=path)
        if distributed.is_main(cfg):
            print(f"kcd_fast: {role} {arch} ({path}) on the {cfg.dataset} validation set ({num_val} samples): "
                  f"top-1 {val_stats['top1']:.2f}%, top-5 {val_stats['top5']:.2f}%, loss {val_stats['loss']:.4f}",
                  flush=True)
    return results


def cli(argv=None) -> int:
    """``python -m kcd_fast.train``: parse, run, and return the exit code (2 for bad input)."""
    args = options.get_args_parser().parse_args(argv)
    status = RunStatus()
    code = 1  # an unexpected exception goes on with its traceback
    try:
        code = _run(args, status)
    finally:
        if code != 0:
            status.remove_made_dirs_if_empty()
    return code


def _run(args, status: RunStatus) -> int:
    """main(args), with each expected way to stop reported in one line; returns the exit code."""
    try:
        main(args, status)
    except UserError as exc:
        print(f"kcd_fast.train: error: {exc}", file=sys.stderr)
        return 2
    except CorruptImageError as exc:  # mid-epoch; from a loader worker, the message ends with the original one
        reason = str(exc).strip().splitlines()[-1].split("CorruptImageError: ", 1)[-1]
        if status.checkpointed:
            advice = ("replace the file, then continue with --resume (removing it renumbers the samples, which a "
                      "resume refuses: start a new run then)")
        else:
            advice = "replace or remove the file, then start the run again (it has no checkpoint yet)"
        print(f"kcd_fast.train: error: {reason}; {advice}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:  # torchrun interrupts every rank: one line is enough
            print("kcd_fast.train: interrupted; " + ("continue with --resume" if status.checkpointed else
                                                     "it had no checkpoint yet: start it again"), file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return 0
