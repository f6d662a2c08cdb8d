"""``OUTPUT_DIR/checkpoint.pth``: what a run saves every epoch, the identity a resumed run must share
with it (settings, samples, teacher), and the guards of ``--output-dir`` (an unfinished run is
not overwritten; a finished run's outputs are replaced, not mixed with the new run's)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from kcd_fast.files import atomic_write, file_hash
from kcd_fast.train.config import UserError
from kcd_fast.train.options import distiller_options

# What a resumed run must share with the checkpoint's run, or it would not continue it.
RESUME_KEYS = (
    "dataset", "train_subset", "fake_size", "fake_val_size", "fake_image_size", "fake_num_classes", "teacher",
    "student", "teacher_epochs", "epochs", "batch_size", "lr", "lr_milestones", "lr_gamma", "lr_scheduler", "lr_min",
    "lr_warmup_epochs", "lr_warmup_decay", "momentum",
    "weight_decay", "amp", "seed", "distill", "kd_temperature", "ce_weight", "kd_weight", "ce_weight_dkd",
    "dkd_alpha", "dkd_beta", "dkd_warmup", "kcd", "stage_epochs", "rho", "alpha", "eps_max", "schedule", "k0",
    "selection", "online_recording", "vaks", "adaptive_eps", "entropy_temperature", "condensed", "knowledge",
    "storage", "topk", "knowledge_dtype", "knowledge_fill", "protocol",
    *(option for _, option, *_ in distiller_options()))
# Options added after kcd_fast 0.1.0, with the behaviour its checkpoints' runs had (a feature
# distiller's options are None in a run that does not use it).
ADDED_OPTIONS = {"protocol": "paper", **{option: None for _, option, *_ in distiller_options()}}
# Keys of a checkpoint this trainer writes, and of its run identity ("args").
CHECKPOINT_KEYS = ("model", "optimizer", "lr_scheduler", "scaler", "condenser", "epoch", "history", "best", "args",
                   "knowledge_state", "fill_forwards", "fill_time_s", "teacher_score", "samples", "wall_time_s")
IDENTITY_KEYS = (*(k for k in RESUME_KEYS if k not in ADDED_OPTIONS), "world_size", "workers", "teacher_hash",
                 "condensed_hash")
# protocol="official": the mixed pixels as of the checkpoint; a feature distiller's state (its
# connectors, heads, memory banks).
OPTIONAL_KEYS = {"pixels_state": None, "distiller": None}

# A run's own outputs in --output-dir (a teacher trained here, teacher-*.pth, is a cache and stays).
RUN_OUTPUTS = ("checkpoint.pth", "student.pth", "student_best.pth", "condensed.pt", "summary.json", "metrics.jsonl",
               "knowledge-state-e*.kcdk", "pixels-state-e*.pt", "plots/accuracy_kept.png",
               "plots/value_distribution.png", "plots/rank_likelihood.png", "tb/events.out.tfevents.*")


def identity(cfg, teacher_hash: str) -> dict:
    """The run's settings as a checkpoint records them (``"args"``, and summary.json's): every option,
    the process count, and the teacher and condensed files by content (a path says nothing:
    torchvision's depends on TORCH_HOME)."""
    return {**cfg.as_dict(), "teacher_hash": teacher_hash, "condensed_hash": file_hash(cfg.condensed)}


def save(state: dict, path: Path) -> None:
    """Write ``state`` whole or not at all."""
    with atomic_write(path) as f:
        torch.save(state, f)


def read_for_resume(cfg) -> dict:
    """The checkpoint of ``--resume``, refused (one line naming each difference) if it is not one this
    trainer writes or was made with other settings."""
    path = Path(cfg.output_dir) / "checkpoint.pth"
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path} (one is written at the end of each epoch; "
                        f"a run stopped in its first epoch starts again without --resume)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if not (isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) and "epoch" in ckpt):
            raise TypeError("not a kcd_fast checkpoint")
    except Exception as exc:  # truncated, overwritten, or another program's file
        raise UserError(f"--resume: {path} cannot be read ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:120] if str(exc).strip() else 'no details'}); the "
                        f"trainer writes it whole or not at all, so something else changed it: restore it, or "
                        f"delete it and start again without --resume") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt] + [f"args.{k}" for k in IDENTITY_KEYS
                                                                if k not in ckpt["args"]]
    if missing:
        raise UserError(f"--resume: {path} lacks {', '.join(missing[:4])}{' and more' if len(missing) > 4 else ''}: "
                        f"it was written by another version of kcd_fast; start a new run without --resume")
    _check_same_settings(cfg, {**ADDED_OPTIONS, **ckpt["args"]}, path)
    return {**OPTIONAL_KEYS, **ckpt}


def _check_same_settings(cfg, before: dict, path: Path) -> None:
    mine = cfg.as_dict()

    def same(k):
        if k == "condensed" and before[k] and mine[k]:  # the same file by content
            return before["condensed_hash"] == file_hash(mine[k])
        return before[k] == mine[k]

    diff = [f"--{k.replace('_', '-')} {before[k]!r} there, {mine[k]!r} here" for k in RESUME_KEYS if not same(k)]
    if diff:
        raise UserError(f"--resume: {path} was made with other settings ({'; '.join(diff)}); resume with the "
                        f"same settings, or start a new --output-dir")
    # --loader cpu/gpu draw each crop from (seed, epoch, index): the worker count changes nothing.
    seeded_crops = mine.get("loader") in ("cpu", "gpu") and before.get("loader") == mine.get("loader")
    changed = [f"{mine[k]} {what} instead of {before[k]}" for k, what in
               (("world_size", "processes"), ("workers", "loader workers"))
               if before[k] != mine[k] and not (k == "workers" and seeded_crops)]
    if before.get("loader", mine.get("loader")) != mine.get("loader"):  # checkpoints before --loader: not known
        changed.append(f"--loader {mine['loader']} instead of {before['loader']}")
    if changed and cfg.rank == 0:  # allowed (another machine), but the run is no longer the uninterrupted one
        print(f"kcd_fast: note: resuming with {' and '.join(changed)}; the data order and augmentation from here "
              f"on differ from those of an uninterrupted run", flush=True)


def check_same_samples(ckpt: dict | None, samples: str, cfg) -> None:
    """A resume must index the same samples (a file added or removed renumbers them)."""
    if ckpt is not None and ckpt["samples"] != samples:
        raise UserError(f"--resume: {Path(cfg.output_dir) / 'checkpoint.pth'} was trained on other samples "
                        f"({ckpt['samples']}) than this run has ({samples}): a file added to or removed from the "
                        f"dataset renumbers the samples, which the run's records are indexed by; restore them, or "
                        f"start a new --output-dir")


def check_same_teacher(ckpt: dict | None, teacher_hash: str, teacher_file, cfg) -> None:
    """A resume must distil the teacher (by content) that the checkpoint's epochs distilled."""
    before = ckpt["args"]["teacher_hash"] if ckpt is not None else ""
    if before and before != teacher_hash:
        made = ckpt["args"].get("teacher_weights") or "the teacher that run trained"
        raise UserError(f"--resume: {Path(cfg.output_dir) / 'checkpoint.pth'} distilled {made} (sha256 {before}), "
                        f"this run's teacher is {teacher_file} (sha256 {teacher_hash}); resume with the same "
                        f"teacher, or start a new --output-dir")


def samples_id(cfg, train_set) -> str:
    """Which samples the run's indices name, in order: the dataset, N, what makes fake data (its
    seed and sizes), the class names, every label, an image folder's file list (relative to its
    root, so a moved folder is the same) and the --train-subset draw (its indices, which depend on
    --seed). Recorded in knowledge files and checkpoints and compared when they are reused, so a
    file made for other samples, or a resume after files were added or removed, is refused."""
    parts = [cfg.dataset, len(train_set)]
    if cfg.dataset == "fake":
        parts += [cfg.fake_size, cfg.fake_image_size, cfg.fake_num_classes, cfg.seed]
    h = hashlib.sha256(repr(parts).encode())
    base = train_set.dataset if isinstance(train_set, Subset) else train_set
    classes = getattr(base, "classes", None)
    if classes is not None:
        h.update("\n".join(map(str, classes)).encode())
    targets = getattr(base, "targets", None)
    if targets is not None:
        h.update(np.asarray(targets, dtype=np.int64).tobytes())
    files = getattr(base, "samples", None)  # ImageFolder: (path, class) per sample
    if files is not None:
        root = os.path.join(str(getattr(base, "root", "")), "")
        h.update("\n".join(p[len(root):] if p.startswith(root) else p for p, _ in files).encode())
    if isinstance(train_set, Subset):
        h.update(np.asarray(train_set.indices, dtype=np.int64).tobytes())
    return f"{cfg.dataset}, {len(train_set)} samples, {h.hexdigest()[:16]}"


def check_fresh_output_dir(cfg) -> None:
    """A new run (no --resume) in a folder that holds an unfinished run would overwrite its checkpoint
    at the end of its first epoch: refuse, and say how to continue it instead."""
    path = Path(cfg.output_dir) / "checkpoint.pth"
    if cfg.resume or cfg.test_only or not path.is_file():
        return
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        done, total = int(ckpt["epoch"]) + 1, int(ckpt["args"]["epochs"])
    except Exception as exc:  # not ours, or not readable: either way not something to overwrite unasked
        raise UserError(f"--output-dir {cfg.output_dir} holds a checkpoint.pth that cannot be read "
                        f"({type(exc).__name__}); delete it, or pick another --output-dir") from None
    if done < total:
        raise UserError(f"--output-dir {cfg.output_dir} holds an unfinished run (checkpoint.pth after epoch {done} "
                        f"of {total}): continue it with --resume, or start this run in another --output-dir (or "
                        f"delete {path})")


def clear_previous_run(cfg) -> None:
    """A new run in a folder that held a finished one: remove that run's outputs (RUN_OUTPUTS), so
    that no plot, metric or TensorBoard event of the old run sits beside the new one's. Files this
    run reads (--teacher-weights, --condensed, --knowledge-file) are kept wherever they are."""
    out = Path(cfg.output_dir)
    if cfg.resume or not (out / "checkpoint.pth").is_file():
        return
    inputs = [Path(x) for x in (cfg.teacher_weights, cfg.condensed, cfg.knowledge_file) if x and os.path.isfile(x)]
    removed = 0
    for pattern in RUN_OUTPUTS:
        if "/" in pattern and (out / pattern.split("/")[0]).is_symlink():
            continue  # a plots/ or tb/ linked elsewhere (a shared TensorBoard folder) holds others' files
        for f in out.glob(pattern):
            if f.is_file() and not f.is_symlink() and not any(f.samefile(x) for x in inputs):
                f.unlink()
                removed += 1
    if removed:
        kept = " (the teacher trained there is kept)" if any(out.glob("teacher-*.pth")) else ""
        print(f"kcd_fast: note: {out} held a finished run; its {removed} output file(s) are replaced by this "
              f"run's{kept}", flush=True)


def drop_stale_states(out: Path, keep, inputs=None) -> None:
    """Remove the state files of earlier epochs (knowledge buffers, mixed pixels): all but the names
    in ``keep`` and a --knowledge-file."""
    given = Path(inputs) if inputs and os.path.isfile(inputs) else None
    for f in [*out.glob("knowledge-state-e*.kcdk"), *out.glob("pixels-state-e*.pt")]:
        if f.name not in keep and not (given is not None and f.samefile(given)):
            f.unlink(missing_ok=True)
