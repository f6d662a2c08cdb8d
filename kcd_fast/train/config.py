"""The trainer's options: the parser, the per-dataset defaults, and the read-only :class:`Config`
that :func:`resolve` builds from them once, after checking every number and path."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
from types import MappingProxyType

import torch

from kcd_fast import distill, distillers
from kcd_fast.data import DATASETS, DEFAULT_DATA_DIRS
from kcd_fast.models import available_models, default_models


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
TORCHVISION_TEACHERS = ("resnet18", "resnet34", "resnet50")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
LOADERS = ("auto", "gpu", "cpu", "pil")
FOLDER_DATASETS = ("imagenet",)  # read image by image from JPEG files: --loader chooses how


class Config:
    """The run's settings, read-only: every option of :func:`get_args_parser` by its ``dest`` name,
    plus what :func:`resolve` works out (``ignored_options``, ``torchvision_weights``) and what
    :func:`kcd_fast.train.distributed.setup` adds (``rank``, ``world_size``, ``local_rank``,
    ``distributed``, ``device``). :meth:`replace` gives a changed copy."""

    __slots__ = ("_values",)

    def __init__(self, **values):
        object.__setattr__(self, "_values", {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"Config has no setting {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError(f"Config is read-only: use replace({name}=...) for a changed copy")

    def __getstate__(self):
        return self._values

    def __setstate__(self, values):
        object.__setattr__(self, "_values", values)

    def __repr__(self) -> str:
        return f"Config({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def replace(self, **changes) -> "Config":
        return Config(**{**self._values, **changes})

    def as_dict(self) -> dict:
        """Plain JSON-able values (lists, dicts), as checkpoints and summary.json record them."""
        def plain(v):
            return list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, MappingProxyType) else v

        return {k: plain(v) for k, v in self._values.items()}


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


def resolve(args: argparse.Namespace) -> Config:
    """The run's :class:`Config` from the parsed command line: per-dataset defaults for the options
    left unset (None), the models and the loss looked up, ``--teacher-weights torchvision`` resolved
    to its file, and every number and path checked (:class:`UserError` naming the option)."""
    values = dict(vars(args))
    if values["dataset"] not in DATASET_DEFAULTS:
        raise UserError(f"unknown dataset {values['dataset']!r}; choose one of {', '.join(DATASETS)}")
    # Before the per-dataset defaults: only what the user set counts as set.
    values["ignored_options"] = tuple(ignored_options(args))
    defaulted = {key for key, value in DATASET_DEFAULTS[values["dataset"]].items() if values.get(key) is None}
    values.update({key: DATASET_DEFAULTS[values["dataset"]][key] for key in defaulted})
    if "workers" in defaulted and hasattr(os, "sched_getaffinity"):
        # A default of more loader workers than this process's CPUs only makes DataLoader warn, every epoch.
        values["workers"] = min(values["workers"], len(os.sched_getaffinity(0)))
    _resolve_loader(values, workers_defaulted="workers" in defaulted)
    teacher, student = default_models(values["dataset"])
    values["teacher"], values["student"] = values["teacher"] or teacher, values["student"] or student
    cfg = Config(**values, torchvision_weights=None)
    for flag, name in (("--teacher", cfg.teacher), ("--student", cfg.student)):
        if name not in available_models():
            raise UserError(f"{flag} {name}: unknown model; choose one of {', '.join(available_models())}")
    cfg = _with_torchvision_teacher(cfg)
    _import_loss(cfg)
    cfg = with_distiller_defaults(cfg)
    _check_stages(cfg, defaulted)
    _check_numbers(cfg)
    _check_paths(cfg)
    return cfg


def _resolve_loader(values: dict, workers_defaulted: bool) -> None:
    """``--loader`` made concrete in ``values`` (auto: gpu on CUDA, else cpu, for the folder datasets; the
    datasets held in memory keep auto, their own loader), and with gpu or cpu the default ``--workers``
    from the CPUs this process may use (shared by torchrun's processes on one machine)."""
    loader, dataset = values["loader"], values["dataset"]
    if dataset not in FOLDER_DATASETS:
        if loader != "auto":
            raise UserError(f"--loader {loader} applies to the datasets read from JPEG folders "
                            f"({', '.join(FOLDER_DATASETS)}); --dataset {dataset} is held in memory: leave "
                            f"--loader auto")
        return
    device = values["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = str(device).startswith("cuda")
    if loader == "auto":
        loader = "gpu" if cuda else "cpu"
    if loader == "gpu" and not cuda:
        raise UserError(f"--loader gpu decodes the JPEGs on a CUDA GPU, but this run's device is {device}: expected "
                        f"--loader cpu or auto here (or --device cuda on a machine with a GPU)")
    values["loader"] = loader
    if workers_defaulted and loader != "pil" and hasattr(os, "sched_getaffinity"):
        per_machine = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
        values["workers"] = max(len(os.sched_getaffinity(0)) // per_machine, 1)


def knowledge_file_given(cfg) -> bool:
    """A filled --knowledge-file to read: the run then needs no teacher."""
    return bool(cfg.knowledge == "cached" and cfg.knowledge_file and os.path.isfile(cfg.knowledge_file))


def _with_torchvision_teacher(cfg: Config) -> Config:
    """``--teacher-weights torchvision`` (the default for ImageNet with a torchvision ResNet teacher):
    torchvision's IMAGENET1K_V1 weights, as the file the torch hub cache holds them in (fetched by
    :func:`kcd_fast.train.teacher.fetch_torchvision_weights`). ``teacher_weights`` becomes that path,
    so the run loads, hashes and records a file as for any other teacher."""
    weights = cfg.teacher_weights
    if (weights is None and cfg.dataset == "imagenet" and cfg.teacher in TORCHVISION_TEACHERS
            and not cfg.test_only and not knowledge_file_given(cfg)):
        weights = "torchvision"
    if weights != "torchvision":
        return cfg
    if cfg.teacher not in TORCHVISION_TEACHERS:
        raise UserError(f"--teacher-weights torchvision: torchvision's ImageNet weights are those of "
                        f"{', '.join(TORCHVISION_TEACHERS)}, not of --teacher {cfg.teacher}; pass a checkpoint file")
    from torchvision.models import get_model_weights

    meta = get_model_weights(cfg.teacher).IMAGENET1K_V1
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(meta.url))
    info = {"name": str(meta), "url": meta.url, "path": path, "top1": meta.meta["_metrics"]["ImageNet-1K"]["acc@1"]}
    return cfg.replace(teacher_weights=path, torchvision_weights=MappingProxyType(info))


def _import_loss(cfg) -> None:
    """``--loss-module`` is imported (it registers its losses), then ``--distill`` must name one, or a
    feature distiller."""
    if cfg.loss_module:
        try:
            importlib.import_module(cfg.loss_module)
        except ImportError as exc:
            raise UserError(f"--loss-module {cfg.loss_module}: {exc}") from None
    if cfg.distill not in distill.LOSSES and cfg.distill not in feature_distillers():
        raise UserError(f"--distill {cfg.distill!r} is not a registered loss or distiller; choose one of "
                        f"{', '.join(sorted({*distill.LOSSES, *feature_distillers()}))} (or register a loss in a "
                        f"--loss-module)")


def feature_distillers() -> tuple[str, ...]:
    """The registered distillers that are not logit losses (kd and dkd run as the losses above), including
    any that a --loss-module registered with kcd_fast.distillers.register_distiller."""
    return tuple(sorted(n for n in distillers.DISTILLERS if n not in distill.LOSSES))
# Options of the trainer that the feature distillers' settings share with the logit losses.
SHARED_SETTINGS = ("kd_temperature", "seed")


def distiller_options() -> list[tuple[str, str, type, object, object]]:
    """(distiller, option, type, CIFAR-100 default, ImageNet default) of each feature distiller's own
    settings, in registry order: the trainer's options of those names default to None, which
    :func:`with_distiller_defaults` fills with the run's dataset default."""
    rows = []
    for name in feature_distillers():
        cifar, imagenet = distillers.default_settings(name, "cifar100"), distillers.default_settings(name, "imagenet")
        for f in dataclasses.fields(cifar):
            if f.name not in SHARED_SETTINGS:
                value = getattr(cifar, f.name)
                rows.append((name, f.name, type(value), value, getattr(imagenet, f.name)))
    return rows


def with_distiller_defaults(cfg) -> "Config":
    """The chosen feature distiller's options left unset get their dataset's default, and its settings
    are checked once (:class:`UserError` naming the option); a feature distiller that needs the
    teacher's features of the current view refuses ``--knowledge cached``."""
    if cfg.distill not in feature_distillers():
        return cfg
    defaults = distillers.default_settings(cfg.distill, cfg.dataset)
    # Unset (None), or not an option at all (a distiller registered by a --loss-module): the default.
    cfg = cfg.replace(**{f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults)
                         if f.name not in SHARED_SETTINGS and getattr(cfg, f.name, None) is None})
    try:
        distillers.distiller_settings(cfg.distill, cfg)
    except (ValueError, TypeError) as exc:
        raise UserError(f"--distill {cfg.distill}: {exc}") from None
    if cfg.knowledge == "cached" and distillers.distiller_class(cfg.distill).teacher_taps:
        raise UserError(f"--knowledge cached: --distill {cfg.distill} reads the teacher's features of each batch's "
                        f"own view, which a buffer of soft labels does not hold; use --knowledge online, or a logit "
                        f"distiller ({', '.join(sorted(distill.LOSSES))})")
    return cfg


def _check_stages(cfg, defaulted: set) -> None:
    staged = cfg.kcd and not cfg.condensed and not cfg.test_only  # --condensed trains on a fixed set: no stages
    if cfg.epochs < 1 and not cfg.test_only:
        raise UserError(f"--epochs must be >= 1, got {cfg.epochs}")
    if staged and cfg.stage_epochs < 1:
        raise UserError(f"--stage-epochs must be >= 1, got {cfg.stage_epochs}")
    if staged and cfg.epochs % cfg.stage_epochs:
        def shown(key):
            return f"{getattr(cfg, key)}{f', the {cfg.dataset} default' if key in defaulted else ''}"

        raise UserError(f"--stage-epochs ({shown('stage_epochs')}) must divide --epochs ({shown('epochs')})")


def _need(ok: bool, flag: str, what: str, value) -> None:
    if not ok:
        raise UserError(f"--{flag} must be {what}, got {value}")


def _check_numbers(cfg) -> None:
    """Every number the run uses, before any data is read or any file written."""
    for flag in ("batch-size", "eval-batch-size"):
        value = getattr(cfg, flag.replace("-", "_"))
        _need(value >= 1, flag, "an int >= 1", value)
    _need(cfg.workers >= 0, "workers", "an int >= 0", cfg.workers)
    _need(cfg.seed >= 0, "seed", "an int >= 0", cfg.seed)
    _need(cfg.log_every >= 0, "log-every", "an int >= 0 (0: off)", cfg.log_every)
    if cfg.dataset == "fake":
        for flag in ("fake-size", "fake-val-size", "fake-image-size"):
            value = getattr(cfg, flag.replace("-", "_"))
            _need(value >= 1, flag, "an int >= 1", value)
        _need(cfg.fake_num_classes >= 2, "fake-num-classes", "an int >= 2", cfg.fake_num_classes)
    if cfg.fake_on_device and (cfg.dataset != "fake" or cfg.train_subset):
        raise UserError("--fake-on-device applies to --dataset fake (without --train-subset)")
    if not cfg.test_only:  # the rest is for training, which --test-only skips (its options are named as ignored)
        _check_training_numbers(cfg)


def _check_training_numbers(cfg) -> None:
    _need(cfg.train_subset >= 0, "train-subset", ">= 0 (0: all samples)", cfg.train_subset)
    for flag in ("lr", "kd-temperature", "entropy-temperature", "lr-gamma"):
        value = getattr(cfg, flag.replace("-", "_"))
        _need(math.isfinite(value) and value > 0, flag, "a finite number > 0", value)
    for flag in ("momentum", "weight-decay", "ce-weight", "kd-weight", "ce-weight-dkd", "dkd-alpha", "dkd-beta"):
        value = getattr(cfg, flag.replace("-", "_"))
        _need(math.isfinite(value) and value >= 0, flag, "a finite number >= 0", value)
    _need(cfg.dkd_warmup >= 0, "dkd-warmup", "an int >= 0", cfg.dkd_warmup)
    _need(0 <= cfg.lr_warmup_epochs < cfg.epochs, "lr-warmup-epochs",
          f"an int in [0, --epochs) = [0, {cfg.epochs})", cfg.lr_warmup_epochs)
    _need(math.isfinite(cfg.lr_warmup_decay) and 0 < cfg.lr_warmup_decay <= 1, "lr-warmup-decay", "in (0, 1]",
          cfg.lr_warmup_decay)
    _need(math.isfinite(cfg.lr_min) and 0 <= cfg.lr_min <= cfg.lr, "lr-min", f"in [0, --lr] = [0, {cfg.lr}]",
          cfg.lr_min)
    if cfg.lr_scheduler == "multistep" and cfg.lr_warmup_epochs:
        early = [m for m in cfg.lr_milestones if m <= cfg.lr_warmup_epochs]
        _need(not early, "lr-milestones", f"after the warm-up (epochs > --lr-warmup-epochs {cfg.lr_warmup_epochs})",
              early)
    if cfg.kcd:
        _need(0 < cfg.rho <= 1, "rho", "in (0, 1]", cfg.rho)
        _need(math.isfinite(cfg.alpha) and cfg.alpha >= 0, "alpha", "a finite number >= 0", cfg.alpha)
        _need(0 <= cfg.eps_max <= 1, "eps-max", "in [0, 1]", cfg.eps_max)
    if cfg.knowledge == "cached" and cfg.storage == "topk":
        _need(1 <= cfg.topk <= 64, "topk", "in [1, 64] (and at most the class count)", cfg.topk)
    if cfg.dataset in TRAINABLE_TEACHER and not cfg.teacher_weights and not knowledge_file_given(cfg):
        _need(cfg.teacher_epochs >= 1, "teacher-epochs", "an int >= 1 (the teacher is trained here)",
              cfg.teacher_epochs)


def _check_paths(cfg) -> None:
    """Files the run reads, and the folders it writes, before any work is done."""
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise UserError(f"--output-dir {cfg.output_dir} is a file, not a folder")
    if cfg.test_only:
        _check_test_only(cfg)
        return
    if cfg.student_weights:
        raise UserError("--student-weights applies to --test-only (a run starts its student afresh; to continue one, "
                        "use --resume)")
    if cfg.knowledge_file and cfg.knowledge != "cached":
        raise UserError("--knowledge-file applies to --knowledge cached (online knowledge runs the teacher every "
                        "step and stores nothing)")
    if cfg.knowledge_file and not os.path.isfile(cfg.knowledge_file):
        folder = os.path.dirname(os.path.abspath(cfg.knowledge_file))
        if not os.path.isdir(folder) and folder != os.path.abspath(cfg.output_dir):  # the run makes that one
            raise UserError(f"--knowledge-file {cfg.knowledge_file}: it does not exist yet and its folder {folder} "
                            f"does not exist, so it cannot be written either")
    if cfg.condensed and not cfg.kcd:
        raise UserError("--condensed trains on a condensed set, which --no-kcd would ignore (it trains on every "
                        "sample): leave one of them out")
    if cfg.condensed and not os.path.isfile(cfg.condensed):
        raise UserError(f"--condensed {cfg.condensed}: no such file")
    if (cfg.teacher_weights and not knowledge_file_given(cfg) and not os.path.isfile(cfg.teacher_weights)
            and not cfg.torchvision_weights):
        raise UserError(f"--teacher-weights {cfg.teacher_weights}: no such file")
    if cfg.dataset not in TRAINABLE_TEACHER and not cfg.teacher_weights and not knowledge_file_given(cfg):
        tv = (f" (or a --teacher with torchvision's ImageNet weights: {', '.join(TORCHVISION_TEACHERS)})"
              if cfg.dataset == "imagenet" else "")
        raise UserError(f"--dataset {cfg.dataset} needs --teacher-weights (a trained {cfg.teacher}){tv}; "
                        f"the trainer only trains teachers for {', '.join(TRAINABLE_TEACHER)}")


def _check_test_only(cfg) -> None:
    if cfg.resume:
        raise UserError("--test-only evaluates --student-weights and --teacher-weights, not --resume: to evaluate a "
                        "run's checkpoint, pass --student-weights OUTPUT_DIR/checkpoint.pth")
    if not cfg.student_weights and not cfg.teacher_weights:
        raise UserError("--test-only needs a model to evaluate: --student-weights PATH and/or --teacher-weights PATH")
    for flag in ("student-weights", "teacher-weights"):
        path = getattr(cfg, flag.replace("-", "_"))
        if path and not os.path.isfile(path) and not (flag == "teacher-weights" and cfg.torchvision_weights):
            raise UserError(f"--{flag} {path}: no such file")


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
