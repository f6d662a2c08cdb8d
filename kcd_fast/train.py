"""Knowledge Condensation Distillation trainer: ``python -m kcd_fast.train``.

From a one-minute demo on real data (scikit-learn's digits, the default) to ImageNet
ResNet34 -> ResNet18 on torchrun::

    python -m kcd_fast.train                                   # digits: teacher, then KCD, < 2 min on 2 CPUs
    python -m kcd_fast.train --dataset cifar100 --data-dir DIR --teacher-weights T.pth
    torchrun --nproc_per_node 8 -m kcd_fast.train --dataset imagenet --data-dir DIR   # torchvision's ResNet34 teacher
    python -m kcd_fast.train --test-only --student-weights runs/kcd/student_best.pth  # score a saved student

Structured as torchvision's classification reference: :func:`get_args_parser`, :func:`main`,
:func:`train_one_epoch`, :func:`evaluate`. ``main(args)`` returns the summary dict and raises
:class:`UserError` for bad input; the command line turns that into a message and exit code 2.
Outputs in ``--output-dir``: ``checkpoint.pth`` (every epoch, atomic), ``metrics.jsonl``,
``summary.json``, ``student.pth``, ``condensed.pt``, ``plots/*.png`` and, with tensorboard
installed, ``tb/``.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset

import kcd_fast
from kcd_fast import distill
from kcd_fast.condenser import KCDDataset, KnowledgeCondenser
from kcd_fast.data import DATASETS, DEFAULT_DATA_DIRS, CorruptImageError, DatasetNotFoundError, build_datasets, eval_view
from kcd_fast.knowledge import KnowledgeBuffer, KnowledgeFileError
from kcd_fast.models import available_models, build_model, default_models


class UserError(Exception):
    """Bad input from the user: reported as a one-line message, without a traceback."""


# Paper defaults (Sec. 4) for CIFAR-100 and ImageNet; digits and Fashion-MNIST are scaled so the
# default run (teacher training included) finishes in under two minutes on a 2-core CPU.
DATASET_DEFAULTS = {
    "digits": dict(epochs=30, stage_epochs=5, lr=0.05, lr_milestones=[20, 25], batch_size=64, weight_decay=5e-4,
                   teacher_epochs=15, workers=0, train_subset=0),
    "fashion-mnist": dict(epochs=3, stage_epochs=1, lr=0.05, lr_milestones=[2], batch_size=128, weight_decay=5e-4,
                          teacher_epochs=1, workers=0, train_subset=20000),
    "cifar100": dict(epochs=240, stage_epochs=40, lr=0.05, lr_milestones=[150, 180, 210], batch_size=64,
                     weight_decay=5e-4, teacher_epochs=0, workers=4, train_subset=0),
    "imagenet": dict(epochs=90, stage_epochs=15, lr=0.1, lr_milestones=[30, 60], batch_size=256, weight_decay=1e-4,
                     teacher_epochs=0, workers=8, train_subset=0),
    "fake": dict(epochs=4, stage_epochs=2, lr=0.05, lr_milestones=[3], batch_size=64, weight_decay=5e-4,
                 teacher_epochs=1, workers=0, train_subset=0),
}
TRAINABLE_TEACHER = ("digits", "fashion-mnist", "fake")


def _per_dataset(key: str) -> str:
    """"digits 30, fashion-mnist 3, ...": an option's default for each dataset."""
    def show(v):
        return " ".join(map(str, v)) if isinstance(v, list) else str(v)

    if key in ("teacher", "student"):
        values = {name: default_models(name)[key == "student"] for name in DATASET_DEFAULTS}
    elif key == "data_dir":
        values = {name: DEFAULT_DATA_DIRS[name] for name in DATASET_DEFAULTS if name in DEFAULT_DATA_DIRS}
    else:
        values = {name: d[key] for name, d in DATASET_DEFAULTS.items()}
    return ", ".join(f"{name} {show(v)}" for name, v in values.items())


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default; for an option whose default depends on --dataset, each dataset's, instead
    of argparse's "(default: None)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None and action.dest in _PER_DATASET:
            return f"{text} (default per dataset: {_per_dataset(action.dest)})".strip()
        if action.default is None or action.default is False or "%(default)" in text:
            return text
        return super()._get_help_string(action)


_PER_DATASET = set(next(iter(DATASET_DEFAULTS.values()))) | {"teacher", "student", "data_dir"}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Knowledge Condensation Distillation (KCD) trainer", add_help=add_help,
                                formatter_class=_HelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="digits", choices=DATASETS, help="training data")
    d.add_argument("--data-dir", default=None, help="dataset folder")
    d.add_argument("--download", action="store_true", help="download CIFAR-100 if it is missing")
    d.add_argument("--train-subset", type=int, default=None,
                   help="train on the first N samples of a fixed shuffle (0: all)")
    d.add_argument("--fake-size", type=int, default=2048, help="fake: training samples")
    d.add_argument("--fake-val-size", type=int, default=512, help="fake: validation samples")
    d.add_argument("--fake-image-size", type=int, default=32, help="fake: image side")
    d.add_argument("--fake-num-classes", type=int, default=10, help="fake: classes")
    d.add_argument("--fake-on-device", action="store_true",
                   help="fake: generate the data on the training device and feed batches from there (no loader), "
                        "for throughput runs where the loader must not hide anything")
    d.add_argument("--workers", type=int, default=None, help="data loader workers per process (the default is capped at the CPUs this process "
                                                         "may use)")

    m = p.add_argument_group("models")
    m.add_argument("--teacher", default=None, help=f"teacher architecture, one of {', '.join(available_models())}")
    m.add_argument("--student", default=None, help="student architecture")
    m.add_argument("--teacher-weights", default=None,
                   help="teacher checkpoint (.pth), or 'torchvision': torchvision's ImageNet-1K weights of resnet18/34/50 "
                        "(IMAGENET1K_V1, CRD's and the paper's ImageNet teachers), downloaded once into the torch hub "
                        "cache; the default for --dataset imagenet with those teachers")
    m.add_argument("--student-weights", default=None,
                   help="--test-only: a student checkpoint to evaluate (student.pth, student_best.pth, checkpoint.pth "
                        "or any .pth holding its state_dict)")
    m.add_argument("--teacher-epochs", type=int, default=None,
                   help="digits/fashion-mnist/fake without --teacher-weights: epochs to train the teacher first")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=None, help="I, training epochs")
    o.add_argument("--batch-size", type=int, default=None, help="global batch size (split across processes)")
    o.add_argument("--lr", type=float, default=None, help="initial learning rate")
    o.add_argument("--lr-milestones", type=int, nargs="*", default=None, help="epochs where lr is multiplied by gamma")
    o.add_argument("--lr-gamma", type=float, default=0.1, help="lr factor at each milestone")
    o.add_argument("--lr-scheduler", default="multistep", choices=["multistep", "cosine"],
                   help="multistep: lr times --lr-gamma at each of --lr-milestones (the paper's); cosine: cosine "
                        "decay toward --lr-min, which it would reach one epoch after the last (as torchvision's "
                        "reference)")
    o.add_argument("--lr-min", type=float, default=0.0, help="cosine: the learning rate it decays to")
    o.add_argument("--lr-warmup-epochs", type=int, default=0,
                   help="epochs of linear warm-up before the schedule, from lr times --lr-warmup-decay up to lr")
    o.add_argument("--lr-warmup-decay", type=float, default=0.01, help="the warm-up's first lr, as a fraction of lr")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    o.add_argument("--weight-decay", type=float, default=None, help="SGD weight decay")
    o.add_argument("--amp", default="off", choices=["bf16", "fp16", "off"], help="autocast precision")
    o.add_argument("--seed", type=int, default=0, help="seed of every random stream (data order, "
                   "augmentation, initialisation): a run is repeatable, and resumable to the same result")
    o.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")

    k = p.add_argument_group("distillation")
    k.add_argument("--distill", default="kd",
                   help=f"logit loss: {', '.join(sorted(distill.LOSSES))}, or one registered by --loss-module")
    k.add_argument("--loss-module", default=None,
                   help="a module to import first, which registers losses with kcd_fast.distill.register_loss")
    k.add_argument("--kd-temperature", type=float, default=4.0, help="temperature of the distillation loss")
    k.add_argument("--ce-weight", type=float, default=0.1, help="kd: weight of the cross-entropy")
    k.add_argument("--kd-weight", type=float, default=0.9, help="kd: weight of the KL term")
    k.add_argument("--ce-weight-dkd", type=float, default=1.0, help="dkd: weight of the cross-entropy")
    k.add_argument("--dkd-alpha", type=float, default=1.0, help="dkd: weight of the target-class term")
    k.add_argument("--dkd-beta", type=float, default=8.0, help="dkd: weight of the non-target-class term")
    k.add_argument("--dkd-warmup", type=int, default=20, help="dkd: epochs over which its weights ramp up")

    c = p.add_argument_group("knowledge condensation")
    c.add_argument("--kcd", action=argparse.BooleanOptionalAction, default=True,
                   help="KCD (--no-kcd: vanilla KD on the full set, the baseline)")
    c.add_argument("--stage-epochs", type=int, default=None, help="T, epochs per stage")
    c.add_argument("--rho", type=float, default=0.7, help="final kept fraction")
    c.add_argument("--alpha", type=float, default=0.03, help="cost weight of Eq. 13 (0: w/o CAR)")
    c.add_argument("--eps-max", type=float, default=0.3, help="eps_m of Eq. 15")
    c.add_argument("--schedule", default="exp", choices=["exp", "linear"],
                   help="how the kept fraction tau^t falls to rho over the stages")
    c.add_argument("--k0", default="dropped", choices=["dropped", "all"],
                   help="VAKS partners: the points dropped at this stage (the official code) or every dropped "
                        "point (the paper's text)")
    c.add_argument("--selection", default="kcd", choices=["kcd", "random"], help="random: OGVE w/ random")
    c.add_argument("--online-recording", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-online-recording: w/o OVR (value = last visit's entropy)")
    c.add_argument("--vaks", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-vaks: direct selection, K^ = K1")
    c.add_argument("--adaptive-eps", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-adaptive-eps: eps = eps_m for all pairs")
    c.add_argument("--entropy-temperature", type=float, default=1.0, help="temperature of the recorded entropy")
    c.add_argument("--condensed", default=None, help="train on a condensed set saved by an earlier run (Fig. 4)")

    q = p.add_argument_group("knowledge source")
    q.add_argument("--knowledge", default="online", choices=["online", "cached"],
                   help="online: run the teacher every step, VAKS mixes the inputs; cached: the teacher fills a "
                        "soft-label buffer in the first epoch and is not run again, VAKS mixes the soft labels")
    q.add_argument("--storage", default="dense", choices=["dense", "topk"], help="cached: soft-label storage")
    q.add_argument("--topk", type=int, default=10, help="cached, topk storage: classes kept per sample")
    q.add_argument("--knowledge-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="cached: dtype of the stored probabilities")
    q.add_argument("--knowledge-fill", default="lazy", choices=["lazy", "pass"],
                   help="cached: fill during the first epoch (its augmented view) or by a one-off pass with the "
                        "evaluation transform")
    q.add_argument("--knowledge-file", default=None,
                   help="cached: a soft-label file; read if it exists (the teacher is then never run), else "
                        "written once the buffer is filled, to distil other students from")

    r = p.add_argument_group("running")
    r.add_argument("--output-dir", default="runs/kcd", help="where checkpoints, metrics and plots go")
    r.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pth")
    r.add_argument("--test-only", action="store_true",
                   help="evaluate --student-weights and/or --teacher-weights on the validation set, print top-1 and "
                        "top-5, and stop: nothing is trained or written")
    r.add_argument("--eval-teacher", action=argparse.BooleanOptionalAction, default=None,
                   help="score a --teacher-weights teacher on the validation set at the start (one pass; printed and "
                        "in summary.json), as CRD's trainer does (default: on with --knowledge online; off with "
                        "cached, whose teacher runs in the first epoch only)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    r.add_argument("--log-every", type=int, default=0,
                   help="print a line every N steps (images/s over all ranks, elapsed time, the epoch's ETA; no "
                        "loss, which would make the host wait for the GPU), e.g. for a log file, where progress "
                        "bars do not show (0: one line per epoch only)")
    r.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="PNG plots at the end")
    r.add_argument("--eval-batch-size", type=int, default=256, help="batch size of evaluation and of the one-off fill, per process (--batch-size is "
                                "global)")
    return p


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Per-dataset defaults for options left unset (None)."""
    if args.dataset not in DATASET_DEFAULTS:
        raise UserError(f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    if not hasattr(args, "ignored_options"):  # before the per-dataset defaults: only what the user set counts
        args.ignored_options = _ignored_options(args)
    defaulted = set()  # options this fills in: errors about them say so
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
            defaulted.add(key)
    if "workers" in defaulted and hasattr(os, "sched_getaffinity"):
        # A default of more loader workers than this process's CPUs only makes DataLoader warn, every epoch.
        args.workers = min(args.workers, len(os.sched_getaffinity(0)))
    teacher, student = default_models(args.dataset)
    args.teacher = args.teacher or teacher
    args.student = args.student or student
    for flag, name in (("--teacher", args.teacher), ("--student", args.student)):
        if name not in available_models():
            raise UserError(f"{flag} {name}: unknown model; choose one of {', '.join(available_models())}")
    _torchvision_teacher(args)
    if args.loss_module:
        import importlib

        try:
            importlib.import_module(args.loss_module)
        except ImportError as exc:
            raise UserError(f"--loss-module {args.loss_module}: {exc}") from None
    if args.distill not in distill.LOSSES:
        raise UserError(f"--distill {args.distill!r} is not a registered loss; choose one of "
                        f"{', '.join(sorted(distill.LOSSES))} (or register it in a --loss-module)")
    staged = args.kcd and not args.condensed and not args.test_only  # --condensed trains on a fixed set: no stages
    if args.epochs < 1 and not args.test_only:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    if staged and args.stage_epochs < 1:
        raise UserError(f"--stage-epochs must be >= 1, got {args.stage_epochs}")
    if staged and args.epochs % args.stage_epochs:
        def shown(key):
            return f"{getattr(args, key)}{f', the {args.dataset} default' if key in defaulted else ''}"

        raise UserError(f"--stage-epochs ({shown('stage_epochs')}) must divide --epochs ({shown('epochs')})")
    _check_numbers(args)
    _check_paths(args)
    return args


TORCHVISION_TEACHERS = ("resnet18", "resnet34", "resnet50")


def _torchvision_teacher(args) -> None:
    """``--teacher-weights torchvision`` (the default for ImageNet with a torchvision ResNet teacher):
    torchvision's IMAGENET1K_V1 weights, as the file the torch hub cache holds them in (downloaded by
    :func:`fetch_torchvision_weights` if it is not there yet). ``args.teacher_weights`` becomes that
    path, so the run loads, hashes and records a file as for any other teacher."""
    info = getattr(args, "torchvision_weights", None)
    if info and args.teacher_weights != info["path"]:  # set by an earlier call, since changed by the caller
        args.torchvision_weights = None
    if (args.teacher_weights is None and args.dataset == "imagenet" and args.teacher in TORCHVISION_TEACHERS
            and not getattr(args, "test_only", False) and not _knowledge_file_given(args)):
        args.teacher_weights = "torchvision"
    if args.teacher_weights != "torchvision":
        return
    if args.teacher not in TORCHVISION_TEACHERS:
        raise UserError(f"--teacher-weights torchvision: torchvision's ImageNet weights are those of "
                        f"{', '.join(TORCHVISION_TEACHERS)}, not of --teacher {args.teacher}; pass a checkpoint file")
    from torchvision.models import get_model_weights

    weights = get_model_weights(args.teacher).IMAGENET1K_V1
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    args.torchvision_weights = {"name": str(weights), "url": weights.url, "path": path,
                                "top1": weights.meta["_metrics"]["ImageNet-1K"]["acc@1"]}
    args.teacher_weights = path


def _expected_sha256_prefix(path) -> str | None:
    """The sha256 prefix that torch.hub's file names carry (``resnet34-b627a593.pth``), as torch.hub reads it."""
    import re

    found = re.search(r"-([a-f0-9]+)\.", os.path.basename(path))
    return found.group(1) if found else None


# ImageNet-1k's 1000 wnids (n01440764 ... n15075141), sorted and joined by newlines: the class folders
# torchvision's ImageNet weights were trained on, in their label order (checked against two copies
# of the standard class index; tests/data/imagenet1k_wnids.txt holds the list).
IMAGENET1K_WNIDS_SHA256 = "385e0240499426c022b773be1ae4da780f057b89c9694c7f47199f62746b6edd"


def fetch_torchvision_weights(args, classes) -> None:
    """Make torchvision's teacher weights ready in the torch hub cache: downloaded if they are not
    there (the local rank 0 of each node downloads while the node's other ranks wait; every rank
    reaches the one barrier), then checked against the sha256 prefix in their file name, as torch.hub
    does, on every start. ``classes``: the dataset's class names (ImageNet's must be its 1000 wnid
    folders, which sort into torchvision's label order). Every failure is a UserError that says
    what to do."""
    info = getattr(args, "torchvision_weights", None)
    if not info:
        return
    import re

    path, what = args.teacher_weights, f"--teacher-weights torchvision ({info['name']})"
    if len(classes) != 1000:
        raise UserError(f"{what} classifies ImageNet's 1000 classes, the dataset has {len(classes)}: pass "
                        f"--teacher-weights PATH, a teacher trained on these classes")
    odd = [c for c in classes if not re.fullmatch(r"n\d{8}", str(c))]
    if args.dataset == "imagenet" and odd:
        raise UserError(f"{what}: the class folders must be ImageNet's wnids (n01440764, ...), which sort into "
                        f"torchvision's label order; {args.data_dir} has {', '.join(map(str, odd[:3]))}, so the "
                        f"teacher's outputs would be matched to the wrong classes")
    listed = hashlib.sha256("\n".join(sorted(map(str, classes))).encode()).hexdigest()
    if args.dataset == "imagenet" and listed != IMAGENET1K_WNIDS_SHA256:
        raise UserError(f"{what}: the 1000 class folders of {args.data_dir} are wnids, but not ImageNet-1k's "
                        f"(ILSVRC-2012: the sha256 of their sorted, newline-joined names is {listed[:16]}..., "
                        f"ImageNet-1k's is {IMAGENET1K_WNIDS_SHA256[:16]}...), so the teacher's outputs would be "
                        f"matched to the wrong classes; pass --teacher-weights PATH, a teacher trained on these")
    digest = _expected_sha256_prefix(path)
    failed = None
    try:
        if args.local_rank == 0 and not os.path.isfile(path):
            print(f"kcd_fast: downloading torchvision's {info['name']} ({info['top1']}% top-1) for --teacher "
                  f"{args.teacher} to {path}", flush=True)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(info["url"], path, hash_prefix=digest,
                                               progress=args.progress and sys.stderr.isatty())
            except Exception as exc:  # offline, refused, unwritable, or a file whose hash is not the one in its name
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "-"
                failed = (f"{what}: could not download {info['url']} to {path} ({type(exc).__name__}: {detail}); "
                          f"put that file there, or pass --teacher-weights PATH")
    finally:
        if args.distributed:
            dist.barrier()  # every rank, whether it downloaded, found the file, or failed
    if failed:
        raise UserError(failed)
    if not os.path.isfile(path):  # a rank whose node's download failed
        raise UserError(f"{what}: {path} was not downloaded (see the message of this node's local rank 0)")
    if digest and not _file_hash(path, length=None).startswith(digest):
        raise UserError(f"{what}: {path} is not torchvision's file (its sha256 does not start with {digest}); delete "
                        f"it to download it again, or put {info['url']} there")


def _ignored_options(args) -> list[str]:
    """The options set to other than their default that this run does not use, each as
    ``"--flag value: it applies to ..."``. The run goes on without them and says so (and
    summary.json lists them): an option that does nothing must not pass unnoticed."""
    parser = get_args_parser(add_help=False)
    defaults = vars(parser.parse_args([]))
    position = {a.dest: i for i, a in enumerate(parser._actions)}  # report in --help's order
    rules = []  # (dest, where it applies)

    def off(keys, where):
        rules.extend((k, where) for k in keys)

    if getattr(args, "test_only", False):
        off([k for k in defaults if k not in TEST_ONLY_OPTIONS], "training, which --test-only skips")
        return _named(args, rules, defaults, position)
    if args.knowledge != "cached":
        off(("storage", "knowledge_dtype", "knowledge_fill", "topk"), "--knowledge cached")
    elif args.storage != "topk":
        off(("topk",), "--storage topk")
    if _knowledge_file_given(args):
        off(("knowledge_fill",), "filling a buffer, which a filled --knowledge-file makes unnecessary")
    if args.fake_on_device and (args.teacher_weights or _knowledge_file_given(args)):
        off(("workers",), "data loaders, which --fake-on-device does without")
    kcd_keys = ("stage_epochs", "rho", "alpha", "eps_max", "schedule", "k0", "selection", "online_recording", "vaks",
                "adaptive_eps", "entropy_temperature")
    if not args.kcd:
        off(kcd_keys, "KCD, which --no-kcd turns off")
    elif args.condensed:
        off(kcd_keys, "condensing, which --condensed replaces by the file's fixed set and pairs")
    else:
        if not args.vaks:
            off(("k0", "eps_max", "adaptive_eps"), "VAKS, which --no-vaks turns off")
        if args.selection == "random":
            off(("alpha", "online_recording", "entropy_temperature"), "--selection kcd (random ranks at random)")
    if args.lr_scheduler == "multistep":
        off(("lr_min",), "--lr-scheduler cosine")
        if args.lr_milestones == []:
            off(("lr_gamma",), "--lr-milestones, of which none are given")
    else:
        off(("lr_milestones", "lr_gamma"), "--lr-scheduler multistep")
    if not args.lr_warmup_epochs:
        off(("lr_warmup_decay",), "--lr-warmup-epochs > 0")
    if args.distill == "kd":
        off(("ce_weight_dkd", "dkd_alpha", "dkd_beta", "dkd_warmup"), "--distill dkd")
    elif args.distill == "dkd":
        off(("ce_weight", "kd_weight"), "--distill kd")
    if args.dataset != "fake":
        off(("fake_size", "fake_val_size", "fake_image_size", "fake_num_classes"), "--dataset fake")
    if args.dataset != "cifar100":
        off(("download",), "--dataset cifar100")
    if args.dataset in ("digits", "fake"):
        off(("data_dir",), "the datasets read from a folder (fashion-mnist, cifar100, imagenet)")
    if not args.teacher_weights or _knowledge_file_given(args):
        off(("eval_teacher",), "a --teacher-weights teacher that this run loads (one trained here is scored as it is "
                               "trained)")
    if args.dataset not in TRAINABLE_TEACHER or args.teacher_weights or _knowledge_file_given(args):
        off(("teacher_epochs",), f"a teacher trained here ({', '.join(TRAINABLE_TEACHER)} without --teacher-weights "
                                 f"or a filled --knowledge-file)")
    return _named(args, rules, defaults, position)


def _named(args, rules, defaults, position) -> list[str]:
    """``"--flag value: it applies to WHERE"`` for each rule's option that is set to other than its default."""
    ignored = []
    for key, where in sorted(rules, key=lambda rule: position[rule[0]]):
        value = getattr(args, key, defaults[key])
        if value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            shown = flag if value else "--no-" + flag[2:]
        elif isinstance(value, list):
            shown = " ".join([flag, *map(str, value)])
        else:
            shown = f"{flag} {value}"
        ignored.append(f"{shown}: it applies to {where}")
    return ignored


# What --test-only uses: the validation data, the two models, and how to evaluate them.
TEST_ONLY_OPTIONS = ("dataset", "data_dir", "download", "fake_size", "fake_val_size", "fake_image_size",
                     "fake_num_classes", "fake_on_device", "workers", "teacher", "student", "teacher_weights",
                     "student_weights", "amp", "seed", "device", "test_only", "progress", "eval_batch_size")


def _check_numbers(args) -> None:
    """Every number the run uses, before any data is read or any file written."""
    import math

    def need(ok: bool, flag: str, what: str, value) -> None:
        if not ok:
            raise UserError(f"--{flag} must be {what}, got {value}")

    for flag in ("batch-size", "eval-batch-size"):
        value = getattr(args, flag.replace("-", "_"))
        need(value >= 1, flag, "an int >= 1", value)
    need(args.workers >= 0, "workers", "an int >= 0", args.workers)
    need(args.seed >= 0, "seed", "an int >= 0", args.seed)
    need(args.log_every >= 0, "log-every", "an int >= 0 (0: off)", args.log_every)
    if args.dataset == "fake":
        for flag in ("fake-size", "fake-val-size", "fake-image-size"):
            value = getattr(args, flag.replace("-", "_"))
            need(value >= 1, flag, "an int >= 1", value)
        need(args.fake_num_classes >= 2, "fake-num-classes", "an int >= 2", args.fake_num_classes)
    if args.fake_on_device and (args.dataset != "fake" or args.train_subset):
        raise UserError("--fake-on-device applies to --dataset fake (without --train-subset)")
    if args.test_only:  # what follows is for training, which --test-only skips (its options are named as ignored)
        return
    need(args.train_subset >= 0, "train-subset", ">= 0 (0: all samples)", args.train_subset)
    for flag in ("lr", "kd-temperature", "entropy-temperature", "lr-gamma"):
        value = getattr(args, flag.replace("-", "_"))
        need(math.isfinite(value) and value > 0, flag, "a finite number > 0", value)
    for flag in ("momentum", "weight-decay", "ce-weight", "kd-weight", "ce-weight-dkd", "dkd-alpha", "dkd-beta"):
        value = getattr(args, flag.replace("-", "_"))
        need(math.isfinite(value) and value >= 0, flag, "a finite number >= 0", value)
    need(args.dkd_warmup >= 0, "dkd-warmup", "an int >= 0", args.dkd_warmup)
    need(0 <= args.lr_warmup_epochs < args.epochs, "lr-warmup-epochs", f"an int in [0, --epochs) = [0, {args.epochs})",
         args.lr_warmup_epochs)
    need(math.isfinite(args.lr_warmup_decay) and 0 < args.lr_warmup_decay <= 1, "lr-warmup-decay", "in (0, 1]",
         args.lr_warmup_decay)
    need(math.isfinite(args.lr_min) and 0 <= args.lr_min <= args.lr, "lr-min", f"in [0, --lr] = [0, {args.lr}]",
         args.lr_min)
    if args.lr_scheduler == "multistep" and args.lr_warmup_epochs:
        early = [m for m in args.lr_milestones if m <= args.lr_warmup_epochs]
        need(not early, "lr-milestones", f"after the warm-up (epochs > --lr-warmup-epochs {args.lr_warmup_epochs})",
             early)
    if args.kcd:
        need(0 < args.rho <= 1, "rho", "in (0, 1]", args.rho)
        need(math.isfinite(args.alpha) and args.alpha >= 0, "alpha", "a finite number >= 0", args.alpha)
        need(0 <= args.eps_max <= 1, "eps-max", "in [0, 1]", args.eps_max)
    if args.knowledge == "cached" and args.storage == "topk":
        need(1 <= args.topk <= 64, "topk", "in [1, 64] (and at most the class count)", args.topk)
    if (args.dataset in TRAINABLE_TEACHER and not args.teacher_weights and not _knowledge_file_given(args)
            and not args.test_only):
        need(args.teacher_epochs >= 1, "teacher-epochs", "an int >= 1 (the teacher is trained here)",
             args.teacher_epochs)


def _knowledge_file_given(args) -> bool:
    return bool(args.knowledge == "cached" and args.knowledge_file and os.path.isfile(args.knowledge_file))


def _check_paths(args) -> None:
    """Files the run reads, and the folders it writes, before any work is done."""
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f"--output-dir {args.output_dir} is a file, not a folder")
    if args.test_only:
        _check_test_only(args)
        return
    if args.student_weights:
        raise UserError("--student-weights applies to --test-only (a run starts its student afresh; to continue one, "
                        "use --resume)")
    _check_fresh_output_dir(args)
    if args.knowledge_file and args.knowledge != "cached":
        raise UserError("--knowledge-file applies to --knowledge cached (online knowledge runs the teacher every "
                        "step and stores nothing)")
    if args.knowledge_file and not os.path.isfile(args.knowledge_file):
        folder = os.path.dirname(os.path.abspath(args.knowledge_file))
        if not os.path.isdir(folder) and folder != os.path.abspath(args.output_dir):  # the run makes that one
            raise UserError(f"--knowledge-file {args.knowledge_file}: it does not exist yet and its folder {folder} "
                            f"does not exist, so it cannot be written either")
    if args.condensed and not args.kcd:
        raise UserError("--condensed trains on a condensed set, which --no-kcd would ignore (it trains on every "
                        "sample): leave one of them out")
    if args.condensed and not os.path.isfile(args.condensed):
        raise UserError(f"--condensed {args.condensed}: no such file")
    if (args.teacher_weights and not _knowledge_file_given(args) and not os.path.isfile(args.teacher_weights)
            and not getattr(args, "torchvision_weights", None)):
        raise UserError(f"--teacher-weights {args.teacher_weights}: no such file")
    if (args.dataset not in TRAINABLE_TEACHER and not args.teacher_weights and not _knowledge_file_given(args)):
        tv = (f" (or a --teacher with torchvision's ImageNet weights: {', '.join(TORCHVISION_TEACHERS)})"
              if args.dataset == "imagenet" else "")
        raise UserError(f"--dataset {args.dataset} needs --teacher-weights (a trained {args.teacher}){tv}; "
                        f"the trainer only trains teachers for {', '.join(TRAINABLE_TEACHER)}")


def _check_test_only(args) -> None:
    if args.resume:
        raise UserError("--test-only evaluates --student-weights and --teacher-weights, not --resume: to evaluate a "
                        "run's checkpoint, pass --student-weights OUTPUT_DIR/checkpoint.pth")
    if not args.student_weights and not args.teacher_weights:
        raise UserError("--test-only needs a model to evaluate: --student-weights PATH and/or --teacher-weights PATH")
    for flag in ("student-weights", "teacher-weights"):
        path = getattr(args, flag.replace("-", "_"))
        if path and not os.path.isfile(path) and not (flag == "teacher-weights" and getattr(args, "torchvision_weights",
                                                                                            None)):
            raise UserError(f"--{flag} {path}: no such file")


# What a resumed run must share with the checkpoint's run, or it would not continue it.
RESUME_KEYS = (
    "dataset", "train_subset", "fake_size", "fake_val_size", "fake_image_size", "fake_num_classes", "teacher",
    "student", "teacher_epochs", "epochs", "batch_size", "lr", "lr_milestones", "lr_gamma", "lr_scheduler", "lr_min",
    "lr_warmup_epochs", "lr_warmup_decay", "momentum",
    "weight_decay", "amp", "seed", "distill", "kd_temperature", "ce_weight", "kd_weight", "ce_weight_dkd",
    "dkd_alpha", "dkd_beta", "dkd_warmup", "kcd", "stage_epochs", "rho", "alpha", "eps_max", "schedule", "k0",
    "selection", "online_recording", "vaks", "adaptive_eps", "entropy_temperature", "condensed", "knowledge",
    "storage", "topk", "knowledge_dtype", "knowledge_fill")


# Options added since the first checkpoints, with the value those checkpoints' runs had.
RESUME_KEYS_ADDED = {"lr_scheduler": "multistep", "lr_min": 0.0, "lr_warmup_epochs": 0, "lr_warmup_decay": 0.01}


def _check_resume(args, ckpt_path: Path) -> dict:
    """Load the checkpoint of ``--resume`` and refuse it if it was made with other settings, naming each."""
    if not ckpt_path.is_file():
        raise UserError(f"--resume: no checkpoint at {ckpt_path} (one is written at the end of each epoch; "
                        f"a run stopped in its first epoch starts again without --resume)")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if not (isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) and "epoch" in ckpt):
            raise TypeError("not a kcd_fast checkpoint")
    except Exception as exc:  # truncated, overwritten, or another program's file
        raise UserError(f"--resume: {ckpt_path} cannot be read ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:120] if str(exc).strip() else 'no details'}); the "
                        f"trainer writes it whole or not at all, so something else changed it: restore it, or "
                        f"delete it and start again without --resume") from None
    before = {**RESUME_KEYS_ADDED, **ckpt.get("args", {})}
    def same(k):
        if k == "condensed" and before[k] and args.condensed:  # the same file by content (or by path, for older runs)
            if before.get("condensed_hash"):
                return before["condensed_hash"] == _file_hash(args.condensed)
            return os.path.realpath(before[k]) == os.path.realpath(args.condensed)
        return before[k] == getattr(args, k)

    diff = [f"--{k.replace('_', '-')} {before[k]!r} there, {getattr(args, k)!r} here"
            for k in RESUME_KEYS if k in before and not same(k)]
    if diff:
        raise UserError(f"--resume: {ckpt_path} was made with other settings ({'; '.join(diff)}); resume with the "
                        f"same settings, or start a new --output-dir")
    changed = [f"{getattr(args, k)} {what} instead of {before[k]}" for k, what in
               (("world_size", "processes"), ("workers", "loader workers")) if k in before and before[k] != getattr(args, k)]
    if changed and is_main(args):  # allowed (another machine), but the run is no longer the uninterrupted one
        print(f"kcd_fast: note: resuming with {' and '.join(changed)}; the data order and augmentation from here "
              f"on differ from those of an uninterrupted run", flush=True)
    return ckpt


# --------------------------------------------------------------------------- distributed helpers


def init_distributed(args) -> None:
    """torchrun (env://) sets RANK/WORLD_SIZE/LOCAL_RANK; otherwise a single process."""
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.rank = int(os.environ.get("RANK", "0"))
    args.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    args.distributed = args.world_size > 1
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:<index>") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device!r}: the trainer runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device} was asked for, but no CUDA GPU is available")
        if device.index is not None and not device.index < torch.cuda.device_count():
            raise UserError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if args.device == "cuda":
        torch.cuda.set_device(args.local_rank)
        args.device = f"cuda:{args.local_rank}"
    if args.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo", init_method="env://")


def is_main(args) -> bool:
    return args.rank == 0


def all_reduce_sum(t: torch.Tensor, args) -> torch.Tensor:
    if args.distributed:
        dist.all_reduce(t)
    return t


# --------------------------------------------------------------------------- models


def _state_dict_of(blob, flag: str = "--teacher-weights", path: str = ""):
    for key in ("model", "state_dict", "student"):
        if isinstance(blob, dict) and key in blob and isinstance(blob[key], dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict):
        raise UserError(f"{flag} {path}: the checkpoint holds no state_dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in blob.items()}


def load_weights(model: torch.nn.Module, path: str, num_classes: int, flag: str = "--teacher-weights",
                 arch: str | None = None) -> None:
    """Load a checkpoint into ``model`` (a bare state_dict, or one under "model", "state_dict" or
    "student", with or without DDP's "module." prefix); refuse one whose classifier has another
    class count, or that does not fit, naming ``flag``."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # not a torch checkpoint: a pickle, zip or EOF error, whichever the bytes hit
        raise UserError(f"{flag} {path} is not a torch checkpoint ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'})") from None
    state = _state_dict_of(blob, flag, path)
    own = model.state_dict()
    last = [k for k, v in own.items() if k.endswith("weight") and v.dim() == 2][-1]
    role = flag[2:].split("-")[0]
    if last in state and state[last].shape[0] != own[last].shape[0]:
        raise UserError(f"{flag} {path}: the {role} has {state[last].shape[0]} classes, "
                        f"the dataset has {num_classes}")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or resized:

        def some(keys):
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

        what = "; ".join(f"{label} {some(keys)}" for label, keys in (
            ("missing", missing), ("unexpected", unexpected), ("other shapes for", resized)) if keys)
        made = blob.get("arch") if isinstance(blob, dict) and isinstance(blob.get("arch"), str) else None
        hint = f" (the file says it holds a {made}: pass --{role} {made})" if made and made != arch else ""
        raise UserError(f"{flag} {path} does not fit --{role} {arch or type(model).__name__}{hint}: {what}")
    model.load_state_dict(state)


def load_teacher_weights(model: torch.nn.Module, path: str, num_classes: int) -> None:
    """Load a teacher checkpoint (``--teacher-weights``): :func:`load_weights`."""
    load_weights(model, path, num_classes, "--teacher-weights")


def _class_names(bundle) -> list:
    """The dataset's class names (an ImageFolder's folders), or 0 .. C-1."""
    return list(getattr(bundle.val, "classes", None) or range(bundle.num_classes))


def train_teacher(args, bundle, device) -> tuple[torch.nn.Module, Path]:
    """Train (or reuse) a teacher with cross-entropy, for the datasets that ship without one; returns
    it and the file it is kept in (``OUTPUT_DIR/teacher-<settings hash>.pth``)."""
    teacher = build_model(args.teacher, bundle.num_classes, bundle.in_channels).to(device)
    # Every setting the teacher's training depends on: another one trains (and caches) another teacher.
    data_dir = os.path.abspath(args.data_dir) if args.data_dir and args.dataset not in ("digits", "fake") else ""
    fake = (args.fake_size, args.fake_val_size, args.fake_image_size, args.fake_num_classes) \
        if args.dataset == "fake" else ()
    key = (f"{args.dataset}-{data_dir}-{fake}-{args.teacher}-{bundle.num_classes}-{args.teacher_epochs}-{args.seed}-"
           f"{args.train_subset}-{args.lr}-{args.batch_size}-{args.amp}")
    path = Path(args.output_dir) / f"teacher-{hashlib.sha1(key.encode()).hexdigest()[:10]}.pth"
    reused = path.exists()
    if not reused:
        if is_main(args):
            print(f"kcd_fast: training the teacher {args.teacher} for {args.teacher_epochs} epochs "
                  f"(saved to {path}, reused by later runs)", flush=True)
            torch.manual_seed(args.seed + 12345)
            model = build_model(args.teacher, bundle.num_classes, bundle.in_channels).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(args.teacher_epochs, 1))
            g = torch.Generator().manual_seed(args.seed + 54321)
            order = torch.utils.data.RandomSampler(bundle.train, generator=g)  # what shuffle=True would use
            loader = DataLoader(bundle.train, batch_sampler=NoSingletonBatches(order, args.batch_size),
                                num_workers=args.workers)
            for epoch in range(args.teacher_epochs):
                model.train()
                for x, y in _progress(loader, args, f"teacher {epoch + 1}/{args.teacher_epochs}", len(loader.dataset)):
                    x, y = x.to(device), y.to(device)
                    with _autocast(args):
                        loss = F.cross_entropy(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sched.step()
            acc = evaluate(model, bundle.val, args, device, local=True)["top1"]  # the other ranks wait
            print(f"kcd_fast: teacher top-1 {acc:.2f}%", flush=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "arch": args.teacher, "top1": acc, "key": key}, tmp)
            os.replace(tmp, path)
        if args.distributed:
            dist.barrier()
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if reused and is_main(args):
        print(f"kcd_fast: reusing the teacher {path} (top-1 {blob.get('top1', float('nan')):.2f}%), trained by an "
              f"earlier run with the same settings", flush=True)
    teacher.load_state_dict(blob["model"])
    return teacher, path


# --------------------------------------------------------------------------- the loops


def build_scheduler(optimizer, args) -> torch.optim.lr_scheduler.LRScheduler:
    """The student's learning rate per epoch (``scheduler.step()`` once an epoch, as the paper's
    and torchvision's references do): ``--lr-warmup-epochs`` of linear warm-up, then MultiStepLR
    at the absolute epochs ``--lr-milestones`` or a cosine decay to ``--lr-min`` by the last epoch."""
    lr_sched = torch.optim.lr_scheduler
    warm = args.lr_warmup_epochs
    if args.lr_scheduler == "cosine":
        main_sched = lr_sched.CosineAnnealingLR(optimizer, T_max=args.epochs - warm, eta_min=args.lr_min)
    else:  # the milestones count from the first epoch, warm-up included
        main_sched = lr_sched.MultiStepLR(optimizer, milestones=[m - warm for m in args.lr_milestones],
                                          gamma=args.lr_gamma)
    if not warm:
        return main_sched
    warmup = lr_sched.LinearLR(optimizer, start_factor=args.lr_warmup_decay, total_iters=warm)
    return lr_sched.SequentialLR(optimizer, [warmup, main_sched], milestones=[warm])


def _autocast(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    device_type = "cuda" if str(args.device).startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _progress(iterable, args, desc, total_images, ranks: int = 1):
    """A progress bar on rank 0 over ``total_images``; each of its batches counts ``ranks`` times (under
    DDP every rank passes a batch of the same size at each step). With ``--log-every N``, also a line
    every N steps: images/s, elapsed time and the ETA of ``total_images``, from host clocks only."""
    log_every = getattr(args, "log_every", 0)
    if not (getattr(args, "progress", False) or log_every) or not is_main(args):
        return iterable
    bar = None
    if args.progress:
        from tqdm.auto import tqdm

        # disable=None: no bar when stderr is not a terminal (a log file gets the per-epoch lines only).
        bar = tqdm(total=total_images, desc=desc, unit="img", unit_scale=True, dynamic_ncols=True, leave=False,
                   disable=None)

    def gen():
        start, done, steps = time.time(), 0, 0
        try:
            for batch in iterable:
                yield batch
                n = len(batch[1]) * ranks
                done, steps = min(done + n, total_images), steps + 1  # ranks' last batches may be one short
                if bar is not None:
                    bar.update(n)
                if log_every and steps % log_every == 0:
                    elapsed = time.time() - start
                    rate = done / max(elapsed, 1e-9)
                    eta = max(total_images - done, 0) / max(rate, 1e-9)
                    line = (f"{desc} step {steps}: {done}/{total_images} images, {rate:.0f} img/s, "
                            f"{_clock(elapsed)} elapsed, ETA {_clock(eta)}")
                    if bar is not None and not bar.disable:
                        bar.write(line)
                    else:
                        print(line, flush=True)
        finally:
            if bar is not None:
                bar.close()

    return gen()


def _clock(seconds: float) -> str:
    """h:mm:ss"""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train_one_epoch(student, teacher, loader, optimizer, scaler, condenser, args, epoch, device, total_images,
                    knowledge=None, fill=False):
    """One M-step epoch (Eq. 11) over the condensed set; OGVE recording per batch (Eq. 12).

    The teacher's knowledge comes from the teacher itself (``knowledge`` None), from it while
    filling the buffer (``fill``), or from the buffer alone. No host synchronisation per step:
    the loss is accumulated on the device and read once. Returns the epoch's mean loss, the
    samples passed and the teacher forwards run.
    """
    student.train()
    if teacher is not None:
        teacher.eval()
    forwards = 0
    loss_fn = distill.LOSSES[args.distill]
    # From the buffer, a loss with a variant that reads it itself (kd: the fused kernel reads the rows in
    # place) takes the buffer; any other gets the logits that reproduce its soft labels.
    from_buffer = knowledge is not None and not fill
    buffer_loss_fn = distill.KNOWLEDGE_LOSSES.get(args.distill) if from_buffer else None
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    channels_last = str(device).startswith("cuda")
    for x, y, index in _progress(loader, args, f"epoch {epoch + 1}/{args.epochs}", total_images, args.world_size):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with _autocast(args):
            if not from_buffer:
                with torch.no_grad():
                    t_logits = teacher(x)
                forwards += x.shape[0]
                if fill:
                    knowledge.write(index, t_logits)
            elif buffer_loss_fn is None:
                t_logits = knowledge.teacher_logits(index)
            s_logits = student(x)
            if buffer_loss_fn is not None:
                loss = buffer_loss_fn(s_logits, knowledge, index, y, args, epoch)
            else:
                loss = loss_fn(s_logits, t_logits, y, args, epoch)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if condenser is not None:
            condenser.observe(index.to(device, non_blocking=True), s_logits.detach())
        loss_sum.add_(loss.detach(), alpha=y.shape[0])  # one kernel: in float64, as loss_sum is
        seen += y.shape[0]
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)]),
                            args)
    return {"loss": float(totals[0] / totals[1].clamp_min(1)), "samples": int(totals[1]),
            "teacher_forwards": forwards * args.world_size}


@torch.no_grad()
def evaluate(model, dataset, args, device, *, local: bool = False) -> dict:
    """Top-1/top-5 accuracy and loss over ``dataset``, exact under DDP (disjoint shares, summed).

    ``local``: this process alone scores the whole of ``dataset``, with no collective (the teacher
    that rank 0 trains while the other ranks wait)."""
    model.eval()
    rank, world = (0, 1) if local else (args.rank, args.world_size)
    if isinstance(dataset, tuple):  # (x, y) resident on the device
        x_all, y_all = dataset
        share = torch.arange(rank, len(y_all), world, device=y_all.device)
        loader = ((x_all[i], y_all[i]) for i in share.split(args.eval_batch_size))
    else:
        indices = list(range(rank, len(dataset), world)) if world > 1 else None
        data = Subset(dataset, indices) if indices is not None else dataset
        loader = DataLoader(data, batch_size=args.eval_batch_size, shuffle=False, num_workers=args.workers)
    total = len(y_all) if isinstance(dataset, tuple) else len(dataset)
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for x, y in _progress(loader, args, "eval", total, ranks=world):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(args):
            logits = model(x).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        stats += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), hit[:, 0].sum().double(),
                              hit.any(dim=1).sum().double(), torch.tensor(float(len(y)), device=device).double()])
    if not local:
        stats = all_reduce_sum(stats, args)
    n = max(float(stats[3]), 1.0)
    return {"loss": float(stats[0]) / n, "top1": 100.0 * float(stats[1]) / n, "top5": 100.0 * float(stats[2]) / n}


# --------------------------------------------------------------------------- main


def _subset(dataset, size: int, seed: int):
    if not size or size >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed + 999)
    return Subset(dataset, torch.randperm(len(dataset), generator=g)[:size].sort().values.tolist())


def epoch_seed(seed: int, epoch: int, rank: int, stream: str) -> int:
    """The seed of one random stream ("torch": this process's augmentation and dropout, "loader": its
    loader workers') for (seed, epoch, rank): distinct for every rank and epoch, and the same again
    when a run is resumed."""
    words = [seed & 0xFFFF_FFFF_FFFF_FFFF, epoch, rank, {"torch": 0, "loader": 1}[stream]]  # any int seed
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return repr(x)


def main(args: argparse.Namespace) -> dict:
    """Run the whole job; returns the summary written to summary.json."""
    t_start = time.time()
    args = fill_defaults(args)
    init_distributed(args)
    device = torch.device(args.device)
    out = Path(args.output_dir)
    if args.batch_size % args.world_size:
        raise UserError(f"--batch-size ({args.batch_size}) must be divisible by the number of processes "
                        f"({args.world_size})")
    ckpt_path = out / "checkpoint.pth"
    ckpt = _check_resume(args, ckpt_path) if args.resume else None
    args.condensed_hash = _file_hash(args.condensed)  # recorded: a resume compares the set by content
    if is_main(args):
        for line in args.ignored_options:
            print(f"kcd_fast: note: ignoring {line}", flush=True)
        if args.amp != "off" and device.type == "cpu":
            print(f"kcd_fast: note: --amp {args.amp} on the CPU: autocast there is often several times slower than "
                  f"float32 (it is meant for GPUs)", flush=True)
        late = [m for m in args.lr_milestones if m >= args.epochs] if args.lr_scheduler == "multistep" else []
        if late:  # e.g. CIFAR-100's 150 180 210 in a run shortened with --epochs
            print(f"kcd_fast: note: --lr-milestones {' '.join(map(str, late))} lie at or past --epochs {args.epochs}: "
                  f"the learning rate drops {len(late)} time(s) fewer than the schedule says", flush=True)
    torch.manual_seed(args.seed)

    # --download under torchrun: rank 0 downloads and unpacks while the others wait, then they read its files.
    download_first = args.download and args.distributed
    if download_first and not is_main(args):
        dist.barrier()
    try:
        bundle = build_datasets(args.dataset, args.data_dir, download=args.download and is_main(args),
                                fake_size=args.fake_size, fake_val_size=args.fake_val_size,
                                fake_image_size=args.fake_image_size, fake_num_classes=args.fake_num_classes,
                                seed=args.seed)
    except (DatasetNotFoundError, ValueError, OSError, EOFError) as exc:  # missing, mismatched or corrupt data
        raise UserError(f"--dataset {args.dataset}: {exc}") from None
    finally:
        if download_first and is_main(args):
            dist.barrier()
    if args.test_only:
        return test_only(args, bundle, device)
    if is_main(args):  # only once the run's input is known to be good
        # The folders this creates (out and missing parents), removed again if the run stops before writing.
        _RUN["made_dirs"] = [p for p in (out, *out.parents) if not p.exists()]
        out.mkdir(parents=True, exist_ok=True)
    if args.distributed:
        dist.barrier()
    if args.train_subset > len(bundle.train):
        raise UserError(f"--train-subset {args.train_subset}: the {args.dataset} training set has only "
                        f"{len(bundle.train)} samples (0: all of them)")
    train_set = _subset(bundle.train, args.train_subset, args.seed)
    train_eval = _subset(eval_view(bundle), args.train_subset, args.seed)  # same samples, evaluation transform
    bundle.train = train_set
    n = len(train_set)
    resident = None
    if args.fake_on_device:  # --dataset fake, checked by _check_numbers
        resident = train_set.materialize(device)
        if device.type == "cuda":
            # Stored as the steps use it (channels_last): a gathered batch is then channels_last already, and
            # train_one_epoch's conversion copies nothing (it cost each step a 154 MB copy at 256 x 224^2).
            resident = (resident[0].contiguous(memory_format=torch.channels_last), resident[1])
        bundle.val = bundle.val.materialize(device)
        # The one-off fill must see the very images the student trains on (materialize's noise is
        # not __getitem__'s); device tensors are read in this process, without loader workers.
        train_eval = torch.utils.data.TensorDataset(*resident)

    condenser = None
    if args.kcd:  # before the teacher, so that bad settings cost no teacher training
        try:
            condenser = KnowledgeCondenser(
                n, epochs=args.epochs, stage_epochs=args.epochs if args.condensed else args.stage_epochs,  # one stage
                rho=args.rho, alpha=args.alpha,
                eps_max=args.eps_max, schedule=args.schedule, k0=args.k0, selection=args.selection,
                online_recording=args.online_recording, vaks=args.vaks, adaptive_eps=args.adaptive_eps,
                temperature=args.entropy_temperature, device=device, seed=args.seed)
            if args.condensed:
                condenser.load_condensed(args.condensed)
        except (ValueError, TypeError) as exc:
            where = (f"--condensed {args.condensed}" if args.condensed else
                     f"KCD with --rho {args.rho}, --epochs {args.epochs}, --stage-epochs {args.stage_epochs} on {n} "
                     f"training samples{' (--train-subset)' if args.train_subset else ''}")
            raise UserError(f"{where}: {exc}") from None

    cached = args.knowledge == "cached"
    samples = _samples_id(args, train_set)  # recorded in and checked against knowledge files and checkpoints
    # Checkpoints made before "samples" was recorded: their condenser's N at least.
    ckpt_n = ((ckpt.get("condenser") or {}).get("config") or {}).get("num_samples", n) if ckpt is not None else n
    if ckpt is not None and (ckpt.get("samples", samples) != samples or ckpt_n != n):
        raise UserError(f"--resume: {ckpt_path} was trained on other samples "
                        f"({ckpt.get('samples') or f'{ckpt_n} samples'}) than this run has ({samples}): a file added "
                        f"to or removed from the dataset renumbers the samples, which the run's records are indexed "
                        f"by; restore them, or start a new --output-dir")
    knowledge, knowledge_loaded = None, False
    # Cached mode: the file holding the buffer as of the last checkpoint (filled, mixed as far as the run got).
    knowledge_state = ckpt.get("knowledge_state") if ckpt is not None else None
    if cached and knowledge_state:  # a resume reads it, not --knowledge-file: the teacher is not needed
        knowledge = _load_knowledge(out / knowledge_state, f"--resume: the knowledge state {out / knowledge_state}",
                                    args, device, n, bundle.num_classes, samples)
        knowledge_loaded = True
    elif cached and args.knowledge_file and os.path.isfile(args.knowledge_file):
        # A teacher's knowledge, computed once: the teacher is not needed at all.
        knowledge = _load_knowledge(args.knowledge_file, f"--knowledge-file {args.knowledge_file}", args, device, n,
                                    bundle.num_classes, samples, teacher_hash=_file_hash(args.teacher_weights))
        knowledge_loaded = True
    if cached and knowledge is None and args.condensed and args.knowledge_fill == "lazy":
        raise UserError("--knowledge cached with --condensed trains on a subset from the first epoch, so the lazy "
                        "fill cannot see every sample: add --knowledge-fill pass or a filled --knowledge-file")
    if cached and knowledge is None:
        try:
            knowledge = KnowledgeBuffer(n, bundle.num_classes, storage=args.storage, k=args.topk,
                                        dtype=getattr(torch, args.knowledge_dtype), temperature=args.kd_temperature,
                                        device=device, teacher=args.teacher, samples=samples)
        except (ValueError, TypeError, MemoryError) as exc:
            raise UserError(f"--knowledge cached: {exc}") from None

    # Teacher: given weights, or trained here for the small datasets.
    if knowledge_loaded:
        teacher, teacher_file = None, None
    elif args.teacher_weights:
        fetch_torchvision_weights(args, _class_names(bundle))
        teacher = build_model(args.teacher, bundle.num_classes, bundle.in_channels)
        load_weights(teacher, args.teacher_weights, bundle.num_classes, "--teacher-weights", arch=args.teacher)
        teacher = teacher.to(device)
        teacher_file = args.teacher_weights
    else:  # _check_paths has refused the datasets without a trainable teacher
        teacher, teacher_file = train_teacher(args, bundle, device)
    # The teacher's file, by content (a path says nothing: torchvision's depends on TORCH_HOME): a resumed
    # run that would distil another teacher than the one its checkpoint's epochs distilled is refused.
    teacher_before = ckpt["args"].get("teacher_hash", "") if ckpt is not None else ""
    args.teacher_hash = _file_hash(teacher_file) if teacher is not None else teacher_before
    if teacher is not None and teacher_before and teacher_before != args.teacher_hash:
        made = ckpt["args"].get("teacher_weights") or "the teacher that run trained"
        raise UserError(f"--resume: {ckpt_path} distilled {made} (sha256 {teacher_before}), this run's teacher is "
                        f"{teacher_file} (sha256 {args.teacher_hash}); resume with the same teacher, or start a new "
                        f"--output-dir")
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    # A teacher from a file is scored once, as CRD's and mdistiller's trainers do at the start (one
    # validation pass; a resume reads the score from its checkpoint).
    teacher_score = ckpt.get("teacher_score") if ckpt is not None else None
    eval_teacher = args.knowledge == "online" if args.eval_teacher is None else args.eval_teacher
    if teacher is not None and args.teacher_weights and teacher_score is None and eval_teacher:
        teacher_score = evaluate(teacher, bundle.val, args, device)
        if is_main(args):
            print(f"kcd_fast: teacher {args.teacher} ({args.teacher_weights}): top-1 {teacher_score['top1']:.2f}%, "
                  f"top-5 {teacher_score['top5']:.2f}% on the validation set", flush=True)

    torch.manual_seed(args.seed)
    student = build_model(args.student, bundle.num_classes, bundle.in_channels).to(device)
    if device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    model = student
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.index is not None
                                                          else None)
    optimizer = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = build_scheduler(optimizer, args)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None

    if condenser is not None:
        # Cached knowledge: VAKS mixes the soft labels in the buffer, so the inputs stay unmixed.
        dataset = KCDDataset(train_set, condenser, mix=not cached)
        sampler = condenser.sampler()
    else:
        dataset = _Indexed(train_set)
        sampler = DistributedSampler(dataset, num_replicas=args.world_size, rank=args.rank, shuffle=True,
                                     seed=args.seed)
    loader_gen = torch.Generator()
    if resident is not None:
        loader = DeviceBatches(*resident, sampler, args.batch_size // args.world_size, condenser, mix=not cached)
    else:
        loader = DataLoader(dataset, batch_sampler=NoSingletonBatches(sampler, args.batch_size // args.world_size),
                            num_workers=args.workers, pin_memory=device.type == "cuda", generator=loader_gen,
                            persistent_workers=False)

    start_epoch, history, best = 0, [], {"top1": -1.0, "top5": -1.0, "epoch": -1}
    if ckpt is not None:
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        try:
            scheduler.load_state_dict(ckpt["lr_scheduler"])
        except (KeyError, TypeError, ValueError) as exc:  # a schedule of another kind: _check_resume names the options
            raise UserError(f"--resume: {ckpt_path} holds another learning-rate schedule ({type(exc).__name__}: "
                            f"{exc}); resume with the settings it was made with") from None
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if condenser is not None:
            condenser.load_state_dict(ckpt["condenser"])
        start_epoch, history, best = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"]
        _RUN["checkpointed"] = True
        if is_main(args):
            print(f"kcd_fast: resumed from {ckpt_path} after epoch {start_epoch}/{args.epochs}", flush=True)

    if is_main(args) and not args.resume and ckpt_path.is_file():
        # A finished run's (an unfinished one was refused at the start): every input of this run is
        # loaded, and under DDP every rank has passed that check (the student's wrap synchronised them).
        _clear_previous_run(out, args)
    writer = _tensorboard(out, args)
    if is_main(args):
        _write_metrics(out, history)
        num_val = len(bundle.val[1]) if isinstance(bundle.val, tuple) else len(bundle.val)
        print(f"kcd_fast: {args.dataset} ({n} train / {num_val} val, {bundle.num_classes} classes), "
              f"{args.teacher} -> {args.student}, {'KCD' if args.kcd else 'KD (no KCD)'}, {args.epochs} epochs, "
              f"device {device}, {args.world_size} process(es)", flush=True)

    samples_total = sum(h["samples"] for h in history)
    # The one-off pass's teacher forwards, and the time already spent: kept in the checkpoint.
    fill_forwards = ckpt.get("fill_forwards", 0) if ckpt is not None else 0
    fill_time = ckpt.get("fill_time_s", 0.0) if ckpt is not None else 0.0
    wall_before = ckpt.get("wall_time_s", 0.0) if ckpt is not None else 0.0
    if cached and not knowledge.fully_filled() and args.knowledge_fill == "pass":
        # The one-off pass with the evaluation transform, shared across ranks, then completed.
        t_fill = time.time()
        share = range(args.rank, n, args.world_size)
        mine = knowledge.fill(teacher, train_eval, batch_size=args.eval_batch_size, device=device,
                              num_workers=0 if resident is not None else args.workers, indices=share,
                              autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp),
                              progress=lambda it: _progress(it, args, "knowledge fill", n, ranks=args.world_size))
        # This rank's forwards and the other ranks' shares (of known size: together, every sample once).
        fill_forwards = mine + sum(len(range(r, n, args.world_size)) for r in range(args.world_size) if r != args.rank)
        _finish_fill(knowledge, args, n, owner=lambda: torch.arange(n) % args.world_size)
        teacher = None  # not run again (cached mode reads the buffer): its GPU memory goes back at once
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        fill_time = time.time() - t_fill  # not in any epoch's train_time: summary.json reports it beside them
        if is_main(args):
            print(f"kcd_fast: knowledge filled by a one-off teacher pass over {n} samples in {fill_time:.1f}s",
                  flush=True)
    forwards_total = fill_forwards + sum(h.get("teacher_forwards", 0) for h in history)
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        # Every source of randomness of an epoch derives from (seed, epoch, rank): a resumed run repeats it.
        torch.manual_seed(epoch_seed(args.seed, epoch, args.rank, "torch"))
        loader_gen.manual_seed(epoch_seed(args.seed, epoch, args.rank, "loader"))  # the workers' seeds
        sampler.set_epoch(epoch)
        total_images = len(sampler) * args.world_size
        kept_fraction = condenser.kept_indices().numel() / n if condenser is not None else 1.0
        fill = cached and not knowledge.fully_filled()
        t_train = time.time()
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trains at (scheduler.step() moves it on)
        train_stats = train_one_epoch(model, teacher, loader, optimizer, scaler, condenser, args, epoch, device,
                                      total_images, knowledge=knowledge, fill=fill)
        forwards_total += train_stats["teacher_forwards"]
        mstep_time = time.time() - t_train  # train_one_epoch ends in a host read of its loss: synchronised
        scheduler.step()
        if fill:  # the lazy fill: each rank wrote its own share of this first, full epoch
            _finish_fill(knowledge, args, n, owner=lambda: _epoch_owner(sampler, args, epoch, n))
            # Not run again: dropped, so its GPU memory goes back at once. (Copying its weights to the
            # host, as this did before, cost a ResNet34 about 87 MB of transfers inside the first epoch.)
            teacher = None
        plan = condenser.end_epoch(epoch) if condenser is not None else None
        if cached and plan is not None and args.vaks and plan.k1l.numel():
            knowledge.mix_(plan.k1l, plan.k0, plan.eps)  # VAKS on the soft labels (Eq. 14)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = time.time() - t_train  # M-step and E-step (the checkpoint files are not counted)
        if cached and (fill or (plan is not None and args.vaks)):
            knowledge_state = f"knowledge-state-e{epoch}.kcdk"
            if is_main(args):
                knowledge.save(out / knowledge_state)
        val = evaluate(student, bundle.val, args, device)
        samples_total += train_stats["samples"]
        row = {"epoch": epoch, "lr": lr, "train_loss": train_stats["loss"],
               "val_loss": val["loss"], "top1": val["top1"], "top5": val["top5"],
               "samples": train_stats["samples"],
               "kept_fraction": kept_fraction,
               "C_so_far": samples_total / (n * (epoch + 1)), "epoch_time": time.time() - t0, "train_time": train_time,
               "mstep_time": mstep_time, "estep_time": train_time - mstep_time,
               "condensed": plan is not None, "teacher_forwards": train_stats["teacher_forwards"]}
        history.append(row)
        improved = val["top1"] > best["top1"]
        if improved:
            best = {"top1": val["top1"], "top5": val["top5"], "epoch": epoch}
        # Under DDP, every rank takes part in the condenser's state (it merges the ranks' records first).
        condenser_state = condenser.state_dict() if condenser is not None else None
        if is_main(args):
            stage_note = f", condensed to {plan.num_kept}/{n} (|K1L|={plan.k1l.numel()})" if plan is not None else ""
            print(f"epoch {epoch + 1}/{args.epochs}: loss {row['train_loss']:.4f}, top-1 {val['top1']:.2f}%, "
                  f"top-5 {val['top5']:.2f}%, samples {row['samples']}, C so far {row['C_so_far']:.3f}, "
                  f"{row['epoch_time']:.1f}s{stage_note}", flush=True)
            if improved:  # before the checkpoint that records this best: a resume never lacks its file
                _save_atomic(student.state_dict(), out / "student_best.pth")
            _save_atomic({"model": student.state_dict(), "optimizer": optimizer.state_dict(),
                          "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                          "condenser": condenser_state,
                          "epoch": epoch, "history": history, "best": best, "args": vars(args),
                          "knowledge_state": knowledge_state, "fill_forwards": fill_forwards, "fill_time_s": fill_time,
                          "teacher_score": teacher_score, "samples": samples,
                          "wall_time_s": wall_before + time.time() - t_start}, ckpt_path)
            _RUN["checkpointed"] = True
            _drop_stale_states(out, keep=knowledge_state, inputs=args.knowledge_file)
            _write_metrics(out, history)
            if writer is not None:
                for key in ("train_loss", "val_loss", "top1", "top5", "kept_fraction", "C_so_far", "lr"):
                    writer.add_scalar(key, row[key], epoch)
        if args.distributed:
            dist.barrier()

    summary = _summary(args, history, best, condenser, n, wall_before + time.time() - t_start,
                       teacher_passes=forwards_total, knowledge=knowledge)
    summary["knowledge_fill_time_s"] = fill_time  # the one-off pass (--knowledge-fill pass), outside every epoch
    summary["teacher_score"] = teacher_score  # a --teacher-weights teacher's validation top-1/top-5/loss
    if is_main(args):
        torch.save(student.state_dict(), out / "student.pth")
        if condenser is not None:
            condenser.save_condensed(out / "condensed.pt")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
        if args.plots:
            from kcd_fast import plots

            plots.write_all(out, history, summary)
        if writer is not None:
            writer.close()
        print(f"kcd_fast: done in {summary['wall_time_s']:.1f}s: best top-1 {best['top1']:.2f}%, "
              f"final top-1 {summary['final_top1']:.2f}%, C {summary['C']:.3f}; outputs in {out}", flush=True)
    return summary


def test_only(args, bundle, device) -> dict:
    """``--test-only``: top-1, top-5 and loss of ``--teacher-weights`` (as ``--teacher``) and
    ``--student-weights`` (as ``--student``) on the validation set, with the evaluation transform,
    ``--amp`` and, under torchrun, every rank's share. Nothing is trained or written."""
    val = bundle.val.materialize(device) if args.fake_on_device else bundle.val
    num_val = len(val[1]) if isinstance(val, tuple) else len(val)
    results = {"test_only": True, "dataset": args.dataset, "num_val": num_val}
    for role in ("teacher", "student"):
        path = getattr(args, f"{role}_weights")
        if not path:
            continue
        arch = getattr(args, role)
        if role == "teacher":
            fetch_torchvision_weights(args, _class_names(bundle))
        model = build_model(arch, bundle.num_classes, bundle.in_channels)
        load_weights(model, path, bundle.num_classes, f"--{role}-weights", arch=arch)
        model = model.to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        val_stats = evaluate(model, val, args, device)
        results[role] = dict(val_stats, model=arch, weights=path)
        if is_main(args):
            print(f"kcd_fast: {role} {arch} ({path}) on the {args.dataset} validation set ({num_val} samples): "
                  f"top-1 {val_stats['top1']:.2f}%, top-5 {val_stats['top5']:.2f}%, loss {val_stats['loss']:.4f}",
                  flush=True)
    return results


# A run's own outputs in --output-dir (a teacher trained here, teacher-*.pth, is a cache and stays).
RUN_OUTPUTS = ("checkpoint.pth", "student.pth", "student_best.pth", "condensed.pt", "summary.json", "metrics.jsonl",
               "knowledge-state-e*.kcdk", "plots/accuracy_kept.png", "plots/value_distribution.png",
               "plots/rank_likelihood.png", "tb/events.out.tfevents.*")


def _check_fresh_output_dir(args) -> None:
    """A new run (no --resume) in a folder that holds an unfinished run would overwrite its checkpoint
    at the end of its first epoch: refuse, and say how to continue it instead."""
    ckpt_path = Path(args.output_dir) / "checkpoint.pth"
    if args.resume or not ckpt_path.is_file():
        return
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
        done, total = int(ckpt["epoch"]) + 1, int(ckpt["args"]["epochs"])
    except Exception as exc:  # not ours, or not readable: either way not something to overwrite unasked
        raise UserError(f"--output-dir {args.output_dir} holds a checkpoint.pth that cannot be read "
                        f"({type(exc).__name__}); delete it, or pick another --output-dir") from None
    if done < total:
        raise UserError(f"--output-dir {args.output_dir} holds an unfinished run (checkpoint.pth after epoch {done} "
                        f"of {total}): continue it with --resume, or start this run in another --output-dir (or "
                        f"delete {ckpt_path})")


def _clear_previous_run(out: Path, args) -> None:
    """A new run in a folder that held a finished one: remove that run's outputs (RUN_OUTPUTS), so
    that no plot, metric or TensorBoard event of the old run sits beside the new one's. Files this
    run reads (--teacher-weights, --condensed, --knowledge-file) are kept wherever they are."""
    inputs = [Path(x) for x in (args.teacher_weights, args.condensed, args.knowledge_file) if x and os.path.isfile(x)]
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


class DeviceBatches:
    """Batches gathered from data resident on the device, in the sampler's order (``--fake-on-device``).

    With a condenser and online knowledge, K1L inputs are mixed with their K0 partners here, on
    the device (Eq. 14), as KCDDataset does in the loader workers.
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
        # What a KeptSampler notes as it yields (the condenser's measured cost), noted here per batch.
        note = getattr(self.condenser, "_note_yield", None) if hasattr(self.sampler, "indices") else None
        epoch = getattr(self.sampler, "epoch", 0)
        for b, i in enumerate(order.split(bs)):
            if note is not None:
                note(epoch, i.numel())
            x = self.x[i]
            if mixing and bounds[b + 1] > bounds[b]:
                rows = pos[bounds[b]: bounds[b + 1]] - b * bs
                j = i[rows]
                e = self.condenser.eps[j].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
                x[rows] = (1 - e) * x[rows] + e * self.x[self.condenser.partner[j].long()]
            yield x, self.y[i], i


class _Indexed(torch.utils.data.Dataset):
    """(x, y) -> (x, y, index), for the --no-kcd baseline."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, y, i


def _load_knowledge(path, what: str, args, device, n: int, num_classes: int, samples: str,
                    teacher_hash=None) -> KnowledgeBuffer:
    """A filled knowledge file for this run (its N, C, temperature, storage, k, dtype, teacher name and
    samples; the teacher's weights hash where given), or a one-line UserError saying why not."""
    try:
        if teacher_hash and not KnowledgeBuffer.read_header(path)["teacher_hash"]:
            raise KnowledgeFileError(f"{path} was made by a teacher trained here (it records no weights file), but "
                                     f"this run names --teacher-weights {args.teacher_weights}; leave that out to "
                                     f"use the file's knowledge, or fill a new file from those weights")
        knowledge = KnowledgeBuffer.load(path, device=device, num_samples=n, num_classes=num_classes,
                                         temperature=args.kd_temperature, storage=args.storage,
                                         k=args.topk if args.storage == "topk" else None,
                                         dtype=getattr(torch, args.knowledge_dtype), teacher_hash=teacher_hash,
                                         teacher=args.teacher, samples=samples)
    except (KnowledgeFileError, MemoryError, FileNotFoundError) as exc:
        raise UserError(f"{what}: {exc}") from None
    if not knowledge.fully_filled():
        raise UserError(f"{what} holds only {int(knowledge.filled.sum())} of {n} samples")
    return knowledge


def _finish_fill(knowledge, args, n, owner) -> None:
    """After each rank filled its share: one collective completes every replica; save the file.
    ``owner()`` gives the rank that filled each sample; it is worked out under DDP only (for the lazy
    fill it walks the epoch's sampler of every rank)."""
    if args.distributed:
        knowledge.complete_ranks(owner(), args.rank)
    if not knowledge.fully_filled():
        raise RuntimeError(f"the knowledge buffer holds {int(knowledge.filled.sum())} of {n} samples after the fill")
    if args.knowledge_file and is_main(args):
        # The weights file's hash, as main took it when it loaded the teacher ("" for one trained here).
        knowledge.save(args.knowledge_file, teacher_hash=args.teacher_hash if args.teacher_weights else "")


def _epoch_owner(sampler, args, epoch, n) -> torch.Tensor:
    """The rank whose batches held each sample in ``epoch`` (the lowest, for DDP padding repeats)."""
    owner = torch.full((n,), -1, dtype=torch.int64)
    for r in reversed(range(args.world_size)):
        if isinstance(sampler, DistributedSampler):
            other = DistributedSampler(sampler.dataset, num_replicas=args.world_size, rank=r, shuffle=sampler.shuffle,
                                       seed=sampler.seed)
            other.set_epoch(epoch)
            idx = torch.tensor(list(iter(other)), dtype=torch.int64)
        else:
            other = sampler.condenser.sampler(rank=r, world_size=args.world_size, shuffle=sampler.shuffle)
            other.set_epoch(epoch)
            idx = other.indices()
        owner[idx] = r
    return owner


def _samples_id(args, train_set) -> str:
    """Which samples the run's indices name, in order: the dataset, N, what makes fake data (its
    seed and sizes), the class names, every label, an image folder's file list (relative to its
    root, so a moved folder is the same) and the --train-subset draw (its indices, which depend on
    --seed). Recorded in knowledge files and checkpoints and compared when they are reused, so a
    file made for other samples, or a resume after files were added or removed, is refused."""
    parts = [args.dataset, len(train_set)]
    if args.dataset == "fake":
        parts += [args.fake_size, args.fake_image_size, args.fake_num_classes, args.seed]
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
    return f"{args.dataset}, {len(train_set)} samples, {h.hexdigest()[:16]}"


_FILE_HASHES: dict = {}  # (path, device, inode, size, mtime_ns) -> sha256 hex: each teacher file is read once a start


def _file_hash(path, length: int | None = 16) -> str:
    """The sha256 of a file, hex, its first ``length`` digits ("" for no file). A file is read once
    while it stays the same file with the same size and modification time."""
    if not path or not os.path.isfile(path):
        return ""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key][:length]


def _drop_stale_states(out: Path, keep, inputs=None) -> None:
    given = Path(inputs) if inputs and os.path.isfile(inputs) else None
    for f in out.glob("knowledge-state-e*.kcdk"):
        if f.name != keep and not (given is not None and f.samefile(given)):
            f.unlink(missing_ok=True)


def _summary(args, history, best, condenser, n, wall, teacher_passes, knowledge=None) -> dict:
    final = history[-1] if history else {"top1": float("nan"), "top5": float("nan")}
    passed = sum(h["samples"] for h in history)
    summary = {
        "dataset": args.dataset, "teacher": args.teacher, "student": args.student, "kcd": args.kcd,
        "distill": args.distill, "epochs": args.epochs, "num_train": n,
        "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
        "final_top1": final["top1"], "final_top5": final["top5"],
        # C against what --no-kcd passes on as many ranks (DistributedSampler pads N to whole batches of ranks).
        "C_a": passed, "C": passed / (math.ceil(n / args.world_size) * args.world_size * max(len(history), 1)),
        "knowledge": args.knowledge, "teacher_passes": teacher_passes,
        "wall_time_s": wall, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "kcd_fast": kcd_fast.__version__,
        "device": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu",
        "world_size": args.world_size, "ignored_options": list(args.ignored_options), "args": vars(args),
    }
    if knowledge is not None:
        summary["knowledge_storage"] = dict(knowledge.header(), bytes_per_sample=knowledge.bytes_per_sample())
    if condenser is not None:
        # A fixed condensed set (--condensed) trains on it every epoch: no schedule to predict from.
        summary["C_predicted"] = None if condenser.frozen else condenser.predicted_cost()
        summary["bytes_per_sample"] = condenser.bytes_per_sample()
        summary["stages"] = condenser.history
    return summary


def _write_metrics(out: Path, history: list) -> None:
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    os.replace(tmp, out / "metrics.jsonl")


def _tensorboard(out: Path, args):
    if not is_main(args):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(str(out / "tb"))


# Whether this run has a checkpoint to --resume from (what cli advises on a stop), and the
# folders it created for --output-dir.
_RUN = {"checkpointed": False, "made_dirs": []}


def _remove_made_dirs_if_empty() -> None:
    """A run that stops before writing anything leaves no empty --output-dir (or parents) behind."""
    for made in _RUN["made_dirs"]:  # deepest first
        if not made.is_dir() or any(made.iterdir()):
            return
        made.rmdir()


def cli(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    _RUN.update(checkpointed=False, made_dirs=[])
    code = 1  # an unexpected exception goes on with its traceback
    try:
        code = _run(args)
    finally:
        if code != 0:
            _remove_made_dirs_if_empty()
    return code


def _run(args) -> int:
    """main(args), with each expected way to stop reported in one line; returns the exit code."""
    try:
        main(args)
    except UserError as exc:
        print(f"kcd_fast.train: error: {exc}", file=sys.stderr)
        return 2
    except CorruptImageError as exc:  # mid-epoch; from a loader worker, the message ends with the original one
        reason = str(exc).strip().splitlines()[-1].split("CorruptImageError: ", 1)[-1]
        if _RUN["checkpointed"]:
            advice = ("replace the file, then continue with --resume (removing it renumbers the samples, which a "
                      "resume refuses: start a new run then)")
        else:
            advice = "replace or remove the file, then start the run again (it has no checkpoint yet)"
        print(f"kcd_fast.train: error: {reason}; {advice}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:  # torchrun interrupts every rank: one line is enough
            print("kcd_fast.train: interrupted; " + ("continue with --resume" if _RUN["checkpointed"] else
                                                     "it had no checkpoint yet: start it again"), file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
