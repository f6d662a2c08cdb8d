"""The teacher: loaded from a checkpoint, fetched from torchvision through the torch hub cache, or
trained here for the small datasets that ship without one."""
from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kcd_fast.files import atomic_write, file_hash
from kcd_fast.models import build_model
from kcd_fast.sampling import NoSingletonBatches
from kcd_fast.train import distributed
from kcd_fast.train.config import UserError
from kcd_fast.train.engine import autocast, evaluate
from kcd_fast.train.progress import track

# ImageNet-1k's 1000 wnids (n01440764 ... n15075141), sorted and joined by newlines: the class folders
# torchvision's ImageNet weights were trained on, in their label order (tests/data/imagenet1k_wnids.txt
# holds the list).
IMAGENET1K_WNIDS_SHA256 = "385e0240499426c022b773be1ae4da780f057b89c9694c7f47199f62746b6edd"


def _state_dict_of(blob, flag: str, path: str) -> dict:
    """The state_dict in a checkpoint: the blob itself or its "model", "state_dict" or "student"
    entry, without DDP's "module." prefixes."""
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


def class_names(bundle) -> list:
    """The dataset's class names (an ImageFolder's folders), or 0 .. C-1."""
    return list(getattr(bundle.val, "classes", None) or range(bundle.num_classes))


def expected_sha256_prefix(path) -> str | None:
    """The sha256 prefix that torch.hub's file names carry (``resnet34-b627a593.pth``), read with
    torch.hub's own pattern."""
    found = torch.hub.HASH_REGEX.search(os.path.basename(path))
    return found.group(1) if found else None


def _check_imagenet_classes(cfg, classes, what: str) -> None:
    """torchvision's ImageNet teachers label ImageNet-1k's 1000 wnid folders in sorted order."""
    if len(classes) != 1000:
        raise UserError(f"{what} classifies ImageNet's 1000 classes, the dataset has {len(classes)}: pass "
                        f"--teacher-weights PATH, a teacher trained on these classes")
    if cfg.dataset != "imagenet":
        return
    odd = [c for c in classes if not re.fullmatch(r"n\d{8}", str(c))]
    if odd:
        raise UserError(f"{what}: the class folders must be ImageNet's wnids (n01440764, ...), which sort into "
                        f"torchvision's label order; {cfg.data_dir} has {', '.join(map(str, odd[:3]))}, so the "
                        f"teacher's outputs would be matched to the wrong classes")
    listed = hashlib.sha256("\n".join(sorted(map(str, classes))).encode()).hexdigest()
    if listed != IMAGENET1K_WNIDS_SHA256:
        raise UserError(f"{what}: the 1000 class folders of {cfg.data_dir} are wnids, but not ImageNet-1k's "
                        f"(ILSVRC-2012: the sha256 of their sorted, newline-joined names is {listed[:16]}..., "
                        f"ImageNet-1k's is {IMAGENET1K_WNIDS_SHA256[:16]}...), so the teacher's outputs would be "
                        f"matched to the wrong classes; pass --teacher-weights PATH, a teacher trained on these")


def fetch_torchvision_weights(cfg, classes) -> None:
    """Make torchvision's teacher weights (``--teacher-weights torchvision``) ready in the torch hub
    cache: downloaded by ``torch.hub.load_state_dict_from_url(check_hash=True)`` if they are not there
    (the local rank 0 of each node downloads while the node's other ranks wait; every rank reaches
    the one barrier), then the file checked against the sha256 prefix in its name on every start
    (torch.hub checks a download only). ``classes``: the dataset's class names, which must be
    ImageNet-1k's. Every failure is a UserError that says what to do."""
    info = cfg.torchvision_weights
    if not info:
        return
    path, what = cfg.teacher_weights, f"--teacher-weights torchvision ({info['name']})"
    _check_imagenet_classes(cfg, classes, what)
    failed = None
    try:
        if cfg.local_rank == 0 and not os.path.isfile(path):
            print(f"kcd_fast: downloading torchvision's {info['name']} ({info['top1']}% top-1) for --teacher "
                  f"{cfg.teacher} to {path}", flush=True)
            try:
                torch.hub.load_state_dict_from_url(info["url"], model_dir=os.path.dirname(path), map_location="cpu",
                                                   progress=cfg.progress and sys.stderr.isatty(), check_hash=True,
                                                   weights_only=True)
            except Exception as exc:  # offline, refused, unwritable, or a file whose hash is not the one in its name
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "-"
                failed = (f"{what}: could not download {info['url']} to {path} ({type(exc).__name__}: {detail}); "
                          f"put that file there, or pass --teacher-weights PATH")
    finally:
        distributed.barrier(cfg)  # every rank, whether it downloaded, found the file, or failed
    if failed:
        raise UserError(failed)
    if not os.path.isfile(path):  # a rank whose node's download failed
        raise UserError(f"{what}: {path} was not downloaded (see the message of this node's local rank 0)")
    digest = expected_sha256_prefix(path)
    if digest and not file_hash(path, length=None).startswith(digest):
        raise UserError(f"{what}: {path} is not torchvision's file (its sha256 does not start with {digest}); delete "
                        f"it to download it again, or put {info['url']} there")


def load_teacher(cfg, bundle) -> torch.nn.Module:
    """The ``--teacher-weights`` teacher on the run's device, frozen."""
    fetch_torchvision_weights(cfg, class_names(bundle))
    teacher = build_model(cfg.teacher, bundle.num_classes, bundle.in_channels)
    load_weights(teacher, cfg.teacher_weights, bundle.num_classes, "--teacher-weights", arch=cfg.teacher)
    return teacher.to(cfg.device)


def _trained_teacher_path(cfg, num_classes: int) -> tuple[Path, str]:
    """``OUTPUT_DIR/teacher-<hash>.pth`` for a teacher trained here, and the settings it is keyed by:
    every setting the teacher's training depends on, so another one trains (and caches) another."""
    data_dir = os.path.abspath(cfg.data_dir) if cfg.data_dir and cfg.dataset not in ("digits", "fake") else ""
    fake = (cfg.fake_size, cfg.fake_val_size, cfg.fake_image_size, cfg.fake_num_classes) \
        if cfg.dataset == "fake" else ()
    key = (f"{cfg.dataset}-{data_dir}-{fake}-{cfg.teacher}-{num_classes}-{cfg.teacher_epochs}-{cfg.seed}-"
           f"{cfg.train_subset}-{cfg.lr}-{cfg.batch_size}-{cfg.amp}")
    return Path(cfg.output_dir) / f"teacher-{hashlib.sha1(key.encode()).hexdigest()[:10]}.pth", key


def train_teacher(cfg, bundle) -> tuple[torch.nn.Module, Path]:
    """Train (or reuse) a teacher with cross-entropy, for the datasets that ship without one; returns
    it and the file it is kept in. Rank 0 trains it while the other ranks wait."""
    device = torch.device(cfg.device)
    path, key = _trained_teacher_path(cfg, bundle.num_classes)
    reused = path.exists()
    if not reused and distributed.is_main(cfg):
        print(f"kcd_fast: training the teacher {cfg.teacher} for {cfg.teacher_epochs} epochs "
              f"(saved to {path}, reused by later runs)", flush=True)
        model, acc = _fit_teacher(cfg, bundle, device)
        print(f"kcd_fast: teacher top-1 {acc:.2f}%", flush=True)
        with atomic_write(path) as f:
            torch.save({"model": model.state_dict(), "arch": cfg.teacher, "top1": acc, "key": key}, f)
    if not reused:
        distributed.barrier(cfg)
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if reused and distributed.is_main(cfg):
        print(f"kcd_fast: reusing the teacher {path} (top-1 {blob.get('top1', float('nan')):.2f}%), trained by an "
              f"earlier run with the same settings", flush=True)
    teacher = build_model(cfg.teacher, bundle.num_classes, bundle.in_channels).to(device)
    teacher.load_state_dict(blob["model"])
    return teacher, path


def _fit_teacher(cfg, bundle, device) -> tuple[torch.nn.Module, float]:
    """SGD with a cosine schedule over ``--teacher-epochs``, seeded apart from the student's."""
    torch.manual_seed(cfg.seed + 12345)
    model = build_model(cfg.teacher, bundle.num_classes, bundle.in_channels).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.teacher_epochs, 1))
    order = torch.utils.data.RandomSampler(bundle.train, generator=torch.Generator().manual_seed(cfg.seed + 54321))
    loader = DataLoader(bundle.train, batch_sampler=NoSingletonBatches(order, cfg.batch_size), num_workers=cfg.workers)
    for epoch in range(cfg.teacher_epochs):
        model.train()
        for x, y in track(loader, cfg, f"teacher {epoch + 1}/{cfg.teacher_epochs}", len(loader.dataset)):
            x, y = x.to(device), y.to(device)
            with autocast(cfg):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model, evaluate(model, bundle.val, cfg, device, local=True)["top1"]  # the other ranks wait
