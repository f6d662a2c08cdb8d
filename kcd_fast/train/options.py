"""The trainer's command line: the parser with the per-dataset defaults it shows, the distillers'
options it adds, and which options a run's other settings leave unused (:func:`ignored_options`).
:func:`kcd_fast.train.config.resolve` turns the parsed options into the run's checked ``Config``."""
from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from kcd_fast import distill, distillers
from kcd_fast.data import DATASETS, DEFAULT_DATA_DIRS
from kcd_fast.models import available_models, default_models

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
TORCHVISION_TEACHERS = ("resnet18", "resnet34", "resnet50")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
LOADERS = ("auto", "gpu", "cpu", "pil")
FOLDER_DATASETS = ("imagenet",)  # read image by image from JPEG files: --loader chooses how


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


_PER_DATASET = set(next(iter(DATASET_DEFAULTS.values()))) | {"teacher", "student", "data_dir"}


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
    d.add_argument("--workers", type=int, default=None, help="data loader workers per process (the default is capped at "
                                                         "the CPUs this process may use)")
    d.add_argument("--loader", default="auto", choices=LOADERS,
                   help="how a JPEG folder (--dataset imagenet) is read: gpu, the workers read file bytes and the GPU "
                        "decodes, crops and normalises whole batches; cpu, the workers decode and crop (uint8), the "
                        "device normalises; pil, PIL and the v2 transforms in the workers (the slower twin); auto, gpu "
                        "on CUDA, else cpu. With gpu and cpu, --workers defaults to the CPUs this process may use. The "
                        "datasets held in memory keep their own loader (auto)")

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
    o.add_argument("--amp", default="off", choices=list(AMP_DTYPES), help="autocast precision")
    o.add_argument("--seed", type=int, default=0, help="seed of every random stream (data order, "
                   "augmentation, initialisation): a run is repeatable, and resumable to the same result")
    o.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")

    k = p.add_argument_group("distillation")
    k.add_argument("--distill", default="kd",
                   help=f"the distiller: a logit loss ({', '.join(sorted(distill.LOSSES))}, or one registered by "
                        f"--loss-module) or a feature distiller ({', '.join(sorted(feature_distillers()))}); see "
                        f"docs/distillers.md")
    k.add_argument("--loss-module", default=None,
                   help="a module to import first, which registers losses with kcd_fast.distill.register_loss")
    k.add_argument("--kd-temperature", type=float, default=4.0, help="temperature of the distillation loss")
    k.add_argument("--ce-weight", type=float, default=0.1, help="kd: weight of the cross-entropy")
    k.add_argument("--kd-weight", type=float, default=0.9, help="kd: weight of the KL term")
    k.add_argument("--ce-weight-dkd", type=float, default=1.0, help="dkd: weight of the cross-entropy")
    k.add_argument("--dkd-alpha", type=float, default=1.0, help="dkd: weight of the target-class term")
    k.add_argument("--dkd-beta", type=float, default=8.0, help="dkd: weight of the non-target-class term")
    k.add_argument("--dkd-warmup", type=int, default=20, help="dkd: epochs over which its weights ramp up")
    for name, option, kind, cifar, imagenet in distiller_options():
        shown = f"{cifar}" if cifar == imagenet else f"{cifar}; on ImageNet {imagenet}"
        k.add_argument("--" + option.replace("_", "-"), type=kind, default=None,
                       help=f"{name}: default {shown} (docs/distillers.md)")

    c = p.add_argument_group("knowledge condensation")
    c.add_argument("--kcd", action=argparse.BooleanOptionalAction, default=True,
                   help="KCD (--no-kcd: vanilla KD on the full set, the baseline)")
    c.add_argument("--stage-epochs", type=int, default=None, help="T, epochs per stage")
    c.add_argument("--rho", type=float, default=0.7, help="final kept fraction")
    c.add_argument("--alpha", type=float, default=0.03, help="cost weight of Eq. 13 (0: w/o CAR)")
    c.add_argument("--eps-max", type=float, default=0.3, help="eps_m of Eq. 15")
    c.add_argument("--schedule", default="exp", choices=["exp", "linear"],
                   help="how the kept fraction tau^t falls to rho over the stages")
    c.add_argument("--k0", default="dropped", choices=["dropped", "all", "window"],
                   help="VAKS partners: dropped, the points kept before and dropped at this stage; all, every "
                        "dropped point (the paper's text); window, the rank positions just below the cut, kept "
                        "before or not (the official code's pairing)")
    c.add_argument("--selection", default="kcd", choices=["kcd", "random"], help="random: OGVE w/ random")
    c.add_argument("--online-recording", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-online-recording: w/o OVR (value = last visit's entropy)")
    c.add_argument("--vaks", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-vaks: direct selection, K^ = K1")
    c.add_argument("--adaptive-eps", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-adaptive-eps: eps = eps_m for all pairs")
    c.add_argument("--entropy-temperature", type=float, default=1.0, help="temperature of the recorded entropy")
    c.add_argument("--condensed", default=None, help="train on a condensed set saved by another run (Fig. 4)")
    c.add_argument("--protocol", default="paper", choices=["paper", "official"],
                   help="paper: Alg. 1 as the paper states it (the options above); official: the official code's "
                        "selection (its record, schedule, drop size, K0 window and eps, truncating pixel mixing "
                        "that compounds; docs/paper-notes.md), in one process")

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
    r.add_argument("--eval-batch-size", type=int, default=256, help="batch size of evaluation and of the one-off fill, "
                   "per process (--batch-size is global)")
    return p


def knowledge_file_given(cfg) -> bool:
    """A filled --knowledge-file to read: the run then needs no teacher."""
    return bool(cfg.knowledge == "cached" and cfg.knowledge_file and os.path.isfile(cfg.knowledge_file))


def feature_distillers() -> tuple[str, ...]:
    """The registered distillers that are not logit losses (kd and dkd run as the losses above), including
    any that a --loss-module registered with kcd_fast.distillers.register_distiller."""
    return tuple(sorted(n for n in distillers.DISTILLERS if n not in distill.LOSSES))


# Options of the trainer that the feature distillers' settings share with the logit losses.
SHARED_SETTINGS = ("kd_temperature", "seed")


def distiller_options() -> list[tuple[str, str, type, object, object]]:
    """(distiller, option, type, CIFAR-100 default, ImageNet default) of each feature distiller's own
    settings, in registry order: the trainer's options of those names default to None, which
    :func:`kcd_fast.train.config.with_distiller_defaults` fills with the run's dataset default."""
    rows = []
    for name in feature_distillers():
        cifar, imagenet = distillers.default_settings(name, "cifar100"), distillers.default_settings(name, "imagenet")
        for f in dataclasses.fields(cifar):
            if f.name not in SHARED_SETTINGS:
                value = getattr(cifar, f.name)
                rows.append((name, f.name, type(value), value, getattr(imagenet, f.name)))
    return rows


# What --test-only uses: the validation data, the two models, and how to evaluate them.
TEST_ONLY_OPTIONS = ("dataset", "data_dir", "download", "fake_size", "fake_val_size", "fake_image_size",
                     "fake_num_classes", "fake_on_device", "workers", "loader", "teacher", "student",
                     "teacher_weights", "student_weights", "amp", "seed", "device", "test_only", "progress",
                     "eval_batch_size")
KCD_OPTIONS = ("stage_epochs", "rho", "alpha", "eps_max", "schedule", "k0", "selection", "online_recording", "vaks",
               "adaptive_eps", "entropy_temperature")


def ignored_options(args) -> list[str]:
    """The options set to other than their default that this run does not use, each as
    ``"--flag value: it applies to ..."``, in --help's order. The run goes on without them and says
    so (and summary.json lists them): an option that does nothing must not pass unnoticed."""
    parser = get_args_parser(add_help=False)
    defaults = vars(parser.parse_args([]))
    position = {a.dest: i for i, a in enumerate(parser._actions)}
    ignored = []
    for key, where in sorted(_unused_options(args, defaults), key=lambda rule: position[rule[0]]):
        value = getattr(args, key, defaults[key])
        if value == defaults[key]:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            shown = flag if value else "--no-" + flag[2:]
        elif isinstance(value, (list, tuple)):
            shown = " ".join([flag, *map(str, value)])
        else:
            shown = f"{flag} {value}"
        ignored.append(f"{shown}: it applies to {where}")
    return ignored


def _unused_options(args, defaults: dict) -> list[tuple[str, str]]:
    """(option, where it applies) for every option that this run's other settings leave unused."""
    if args.test_only:
        return [(k, "training, which --test-only skips") for k in defaults if k not in TEST_ONLY_OPTIONS]
    rules = []

    def off(keys, where):
        rules.extend((k, where) for k in keys)

    file_given = knowledge_file_given(args)
    if args.knowledge != "cached":
        off(("storage", "knowledge_dtype", "knowledge_fill", "topk"), "--knowledge cached")
    elif args.storage != "topk":
        off(("topk",), "--storage topk")
    if file_given:
        off(("knowledge_fill",), "filling a buffer, which a filled --knowledge-file makes unnecessary")
    if args.fake_on_device and (args.teacher_weights or file_given):
        off(("workers",), "data loaders, which --fake-on-device does without")
    if not args.kcd:
        off(KCD_OPTIONS + ("protocol",), "KCD, which --no-kcd turns off")
    elif args.condensed:
        off(KCD_OPTIONS + ("protocol",), "condensing, which --condensed replaces by the file's fixed set and pairs")
    else:
        if args.protocol == "official":
            off(("schedule", "k0", "online_recording", "adaptive_eps"),
                "--protocol paper (the official protocol makes its own schedule, record, pairs and eps)")
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
    if args.distill != "dkd":
        off(("ce_weight_dkd", "dkd_alpha", "dkd_beta", "dkd_warmup"), "--distill dkd")
    if args.distill != "kd":
        off(("ce_weight", "kd_weight"), "--distill kd")
    for name, option, *_ in distiller_options():
        if args.distill != name:
            off((option,), f"--distill {name}")
    if args.dataset != "fake":
        off(("fake_size", "fake_val_size", "fake_image_size", "fake_num_classes"), "--dataset fake")
    if args.dataset != "cifar100":
        off(("download",), "--dataset cifar100")
    if args.dataset in ("digits", "fake"):
        off(("data_dir",), "the datasets read from a folder (fashion-mnist, cifar100, imagenet)")
    if not args.teacher_weights or file_given:
        off(("eval_teacher",), "a --teacher-weights teacher that this run loads (one trained here is scored as it is "
                               "trained)")
    if args.dataset not in TRAINABLE_TEACHER or args.teacher_weights or file_given:
        off(("teacher_epochs",), f"a teacher trained here ({', '.join(TRAINABLE_TEACHER)} without --teacher-weights "
                                 f"or a filled --knowledge-file)")
    return rules
