"""The run's read-only :class:`Config`: :func:`resolve` builds it once from the parsed command line
(:mod:`kcd_fast.train.options`), with the per-dataset defaults filled in and every number and path
checked before any data is read."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
from types import MappingProxyType

import torch

from kcd_fast import distill, distillers
from kcd_fast.data import DATASETS
from kcd_fast.models import available_models, default_models
from kcd_fast.train.options import (DATASET_DEFAULTS, FOLDER_DATASETS, SHARED_SETTINGS, TORCHVISION_TEACHERS,
                                    TRAINABLE_TEACHER, feature_distillers, ignored_options, knowledge_file_given)


class UserError(Exception):
    """Bad input from the user: reported as a one-line message, without a traceback."""


class Config:
    """The run's settings, read-only: every option of :func:`kcd_fast.train.options.get_args_parser` by
    its ``dest`` name, plus what :func:`resolve` works out (``ignored_options``, ``torchvision_weights``)
    and what :func:`kcd_fast.train.distributed.setup` adds (``rank``, ``world_size``, ``local_rank``,
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
