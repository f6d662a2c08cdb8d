"""The ImageNet input paths on a GPU host: each loader alone, nvJPEG's decode ceiling, the steps they
feed, and whole runs on JPEG files.

It writes ``--n`` synthetic ImageNet-like JPEGs (:func:`benchmarks.loader_cpu.synthetic_photo`: 500 x 375
on average, each side within +-20%, quality 90) into ``--classes`` class folders, with a few CMYK and
grayscale files among them (ImageNet's train split holds about 22 CMYK JPEGs and a few hundred
grayscale ones), and a validation split. Then, in one process:

(a) ``loaders``: images/s of each trainer loader alone, the batches on the device as the step takes
    them: ``pil`` (PIL decode and v2 transforms in the workers) with 8 workers and with every core,
    ``cpu`` (decode_jpeg + uint8 crops in the workers, normalisation on the device) and ``gpu``
    (bytes from the workers, nvJPEG decode and crops on the device); for ``pil`` and ``cpu`` also
    what the workers deliver alone (``workers_images_per_s``: for ``cpu`` its uint8 crops, the part
    that stays on the CPU of a GPU host);
(b) ``decode_ceiling``: images/s of ``torchvision.io.decode_jpeg(batch, device="cuda")`` alone on the
    same files held in memory; ``transforms``: images/s of the train transform alone on a decoded
    batch, the fused kernel against its twin (v2 image by image);
(c) ``steps``: seconds per step of the KD step (ResNet34 teacher -> ResNet18 student) and the cached
    step (the student alone, soft labels read from a device buffer), fed by each loader and on one
    device-resident batch; on CUDA also fed by ``gpu_in_turn``, the gpu loader preparing each batch
    when the step asks for it instead of ahead in a thread;
(d) ``runs``: whole trainer runs on the JPEG folders with ``--loader gpu`` (``cpu`` without CUDA): KD
    (``--no-kcd``), KCD and cached KCD, their training times, ratios to KD and C, as
    ``benchmarks/wall_ratio.py`` measures them on device-resident data.

The JSON holds the date, commit, device, versions, sizes and every figure; ``targets`` holds the
quantities the acceptance bounds read (docs/jpeg-input.md). On a machine without CUDA it runs a small
version of (a), (c) and (d) on the CPU paths, which checks the script end to end.

    python -m benchmarks.loader --out loader.json                 # on CUDA: 20,000 JPEGs
    python -m benchmarks.loader --n 64 --classes 4 --out /tmp/loader.json   # the CPU version
    python -m benchmarks.loader --smoke --out /tmp/loader.json               # every part, tiny
    python -m benchmarks.loader --n 400 --parts loaders --loader-batches 20 --out cpu.json  # (a) on a CPU
    python -m benchmarks.loader --data-dir /data/imagenet --parts loaders,decode_ceiling --out in.json  # your files

``--data-dir`` names where the JPEG folders are kept: an existing ``train/`` + ``val/`` ImageFolder there
is read as it is (real ImageNet, or the files an earlier run wrote), else the synthetic files are
written there and kept for the next run. ``--parts`` picks among :data:`PARTS`.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from benchmarks.loader_cpu import synthetic_photo
from kcd_fast.data import build_datasets
from kcd_fast.models import build_model
from kcd_fast.train import config, distributed, loaders, options
from kcd_fast.train.main import main as run_trainer

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
CORES = len(os.sched_getaffinity(0))
# the H200's cached ResNet18 step at batch 256 (docs/performance.md): the GPU loader's yardstick until
# this run has timed its own cached step, in (c)
CACHED_STEP_IMAGES_PER_S = 13_000
if CUDA:
    SIZE = dict(n=20_000, classes=1000, val_per_class=1, batch=256, loader_batches=40, steps=30, amp="bf16",
                epochs=6, stage_epochs=1, run_subset=10_000, teacher="resnet34", student="resnet18")
else:
    SIZE = dict(n=64, classes=4, val_per_class=2, batch=16, loader_batches=3, steps=2, amp="off", epochs=2,
                stage_epochs=1, run_subset=0, teacher="resnet34", student="resnet18")
# --smoke: the least that runs every part (tests/test_gpu_benchmarks.py), on any machine.
SMOKE = dict(n=24, classes=3, val_per_class=1, batch=8, loader_batches=1, steps=1, amp="off", epochs=2,
             stage_epochs=1, run_subset=0, teacher="resnet18", student="resnet18")


PARTS = ("loaders", "decode_ceiling", "transforms", "steps", "runs")  # (a), (b), (b), (c), (d)
CUDA_PARTS = ("decode_ceiling", "transforms")
JPEG_SUFFIXES = (".jpeg", ".jpg")


# ---- the files ------------------------------------------------------------------------------------

def write_one(job) -> int:
    """Write one JPEG: (path, seed, mode) with mode "RGB", "CMYK" or "L"; returns its size in bytes."""
    path, seed, mode = job
    rng = np.random.default_rng(seed)
    h, w = int(375 * rng.uniform(0.8, 1.2)), int(500 * rng.uniform(0.8, 1.2))
    Image.fromarray(synthetic_photo(h, w, rng)).convert(mode).save(path, "JPEG", quality=90)
    return Path(path).stat().st_size


def write_folders(root: Path, n: int, classes: int, val_per_class: int) -> dict:
    """root/{train,val}/n<k>/*.JPEG; one train file in 1,000 is CMYK and one in 200 grayscale (at least
    one of each). Returns the counts and the train files' mean size, also kept in root/files.json.
    The files are written beside ``root`` and moved there when complete, so that a run stopped while
    writing leaves no partial folder for :func:`existing_folders` to read."""
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    files = _write_synthetic(partial, n, classes, val_per_class)
    (partial / "files.json").write_text(json.dumps(files))
    partial.rename(root)
    return files


def _write_synthetic(root: Path, n: int, classes: int, val_per_class: int) -> dict:
    jobs = []
    for k in range(classes):
        for split in ("train", "val"):
            (root / split / f"n{k:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        mode = "CMYK" if i % 1000 == 7 else "L" if i % 200 == 3 else "RGB"
        jobs.append((str(root / "train" / f"n{i % classes:08d}" / f"{i:07d}.JPEG"), i, mode))
    for i in range(classes * val_per_class):
        jobs.append((str(root / "val" / f"n{i % classes:08d}" / f"v{i:07d}.JPEG"), 10_000_000 + i, "RGB"))
    with Pool(min(CORES, 16)) as pool:
        sizes = pool.map(write_one, jobs, chunksize=64)
    return {"train": n, "val": classes * val_per_class, "classes": classes,
            "cmyk": sum(j[2] == "CMYK" for j in jobs), "grayscale": sum(j[2] == "L" for j in jobs),
            "mean_train_kb": sum(sizes[:n]) / n / 1e3, "synthetic": True}


def train_files(root: Path) -> list:
    """The JPEG files under root/train, sorted."""
    return sorted(f for f in (root / "train").rglob("*") if f.suffix.lower() in JPEG_SUFFIXES)


def existing_folders(root: Path) -> dict:
    """The counts of a train/ + val/ ImageFolder already at ``root``, as :func:`write_folders` reports them
    (its own record where it wrote them)."""
    if (root / "files.json").is_file():
        return json.loads((root / "files.json").read_text()) | {"reused": True}
    files = train_files(root)
    if not files:
        raise SystemExit(f"--data-dir: {root}/train holds no .JPEG/.jpg files; expected an ImageFolder "
                         f"(train/<class>/<file>) or no train/ folder at all, to write the synthetic files there")
    classes = sum(1 for d in (root / "train").iterdir() if d.is_dir())
    val = sum(1 for f in (root / "val").rglob("*") if f.suffix.lower() in JPEG_SUFFIXES)
    sample = files[:: max(1, len(files) // 1000)]
    return {"train": len(files), "val": val, "classes": classes, "synthetic": False,
            "mean_train_kb": sum(f.stat().st_size for f in sample) / len(sample) / 1e3}


# ---- (a) each loader alone ------------------------------------------------------------------------

def trainer_args(root: Path, teacher: Path, loader: str, workers: int, *extra) -> list:
    s = SIZE
    return ["--dataset", "imagenet", "--data-dir", str(root), "--loader", loader, "--workers", str(workers),
            "--teacher", s["teacher"], "--student", s["student"], "--teacher-weights", str(teacher),
            "--batch-size", str(s["batch"]), "--eval-batch-size", str(s["batch"]), "--amp", s["amp"],
            "--device", "cuda" if CUDA else "cpu", "--no-progress", "--no-plots", "--no-eval-teacher", *extra]


def epoch_loader(root: Path, teacher: Path, loader: str, workers: int):
    """The trainer's epoch loader over every training file (no condenser), for epoch 0."""
    args = options.get_args_parser().parse_args(trainer_args(root, teacher, loader, workers, "--no-kcd"))
    cfg = distributed.setup(config.resolve(args))  # one process: rank 0 of 1
    data = loaders.train_data(cfg, build_datasets("imagenet", root))
    batches, sampler, generator = loaders.train_loader(cfg, data, None, mix=False)
    sampler.set_epoch(0)
    generator.manual_seed(0)
    return batches, torch.device(cfg.device)


def worker_batches(root: Path, teacher: Path, loader: str, workers: int):
    """What the loader workers deliver, before the main process's part (for ``cpu``: uint8 crops, not yet
    normalised; for ``pil``: the normalised float batch; for ``gpu``: file bytes), as (x, ...)."""
    batches, _ = epoch_loader(root, teacher, loader, workers)
    yield from getattr(batches, "loader", batches)


def loader_batches(root: Path, teacher: Path, loader: str, workers: int, ahead=None):
    """The trainer's epoch loader as its step consumes it: (x on the device, channels_last on CUDA; y; index).
    ``ahead``: the batches its main-process part prepares ahead in a thread (None: the trainer's default)."""
    batches, device = epoch_loader(root, teacher, loader, workers)
    if ahead is not None:
        batches.ahead = ahead
    for x, y, index in batches:  # as the trainer's step takes them (kcd_fast/train/engine.py)
        x = x.to(device, non_blocking=True)
        if CUDA:
            x = x.to(memory_format=torch.channels_last)
        yield x, y.to(device, non_blocking=True), index


def sync():
    if CUDA:
        torch.cuda.synchronize()


def window(workers: int, wanted: int) -> tuple[int, int]:
    """(first, count): a timing starts once batch ``first`` is taken and spans the next ``count``.

    The workers start together, so their first round of batches arrives at once; a loader's thread
    prepares a few more ahead. Timed from the first batch, or over part of a round, a loader-bound
    rate comes out high (by a quarter for 16 workers over 40 batches). So the timing starts with the
    second round and spans whole rounds, at least ``wanted`` batches. An epoch too short for that (the
    CPU sizes) is timed from its second batch, as far as it goes."""
    rounds = max(workers, 1)
    first, count = rounds, rounds * -(-wanted // rounds)
    if first + count < SIZE["n"] // SIZE["batch"]:
        return first, count
    return 1, max(1, min(wanted, SIZE["n"] // SIZE["batch"] - 2))


class Clock:
    """Seconds between two points of the current stream's work: CUDA events, so that the start needs no
    host sync (one would let a prefetching loader run ahead meanwhile); the host's clock without CUDA."""

    def start(self) -> None:
        self.t0 = torch.cuda.Event(enable_timing=True) if CUDA else time.perf_counter()
        if CUDA:
            self.t0.record()

    def seconds(self) -> float:
        if not CUDA:
            return time.perf_counter() - self.t0
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self.t0.elapsed_time(end) / 1000


def images_per_s(batches, workers: int) -> tuple[int, float]:
    """(images, seconds) over the :func:`window` of ``loader_batches`` batches, each counted when it is
    ready on the device."""
    first, count = window(workers, SIZE["loader_batches"])
    it, clock, images = iter(batches), Clock(), 0
    for _, batch in zip(range(first), it):
        pass
    clock.start()
    for _, batch in zip(range(count), it):
        images += len(batch[0])
    seconds = clock.seconds()
    # End the loader and its workers now: prefetching workers left alive would run into the next timing.
    if hasattr(it, "close"):
        it.close()
    del it, batches
    gc.collect()
    return images, seconds


def loader_rate(root: Path, teacher: Path, loader: str, workers: int) -> dict:
    """Images/s of one loader alone: the batches as the step takes them, and (except ``gpu``, whose
    workers only read bytes) what its workers deliver before the main process's part."""
    images, seconds = images_per_s(loader_batches(root, teacher, loader, workers), workers)
    out = {"loader": loader, "workers": workers, "images": images, "seconds": seconds, "images_per_s": images / seconds}
    if loader != "gpu":
        images, seconds = images_per_s(worker_batches(root, teacher, loader, workers), workers)
        out["workers_images_per_s"] = images / seconds
    return out


# ---- (b) nvJPEG alone ----------------------------------------------------------------------------

def decode_ceiling(root: Path) -> dict:
    """Images/s of batched ``decode_jpeg(..., device="cuda")`` on the RGB train files held in memory."""
    files = train_files(root)
    data = [torchvision.io.read_file(str(f)) for f in files[: SIZE["batch"] * (SIZE["loader_batches"] + 1)]]
    data = [d for d in data if _components(d) == 3]
    batches = [data[i: i + SIZE["batch"]] for i in range(0, len(data) - SIZE["batch"] + 1, SIZE["batch"])]
    torchvision.io.decode_jpeg(batches[0], device="cuda")
    sync()
    t0 = time.perf_counter()
    for batch in batches[1:]:
        torchvision.io.decode_jpeg(batch, device="cuda")
    sync()
    seconds = time.perf_counter() - t0
    images = sum(len(b) for b in batches[1:])
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def transform_rates(root: Path, device: str = "cuda", size: int = 224) -> dict:
    """Images/s of the train transform alone on one decoded batch on ``device``: the fused Triton kernel
    and its twin (v2 ``resized_crop`` image by image, flip, normalise), bf16 out, as the step takes it."""
    from kcd_fast import crops, jpeg

    files = train_files(root)[: SIZE["batch"]]
    images, _ = jpeg.decode_batch([torchvision.io.read_file(str(f)) for f in files], device)
    boxes, flips = crops.crop_draws(images, 0, 0, range(len(images)))
    out = {"images": len(images)}
    for name, fused in (("fused", True), ("twin", False)):
        crops.train_crops(images, boxes, flips, size, torch.bfloat16, fused=fused)  # compile, warm the caches
        sync()
        t0 = time.perf_counter()
        for _ in range(SIZE["loader_batches"]):
            crops.train_crops(images, boxes, flips, size, torch.bfloat16, fused=fused)
        sync()
        out[f"{name}_images_per_s"] = len(images) * SIZE["loader_batches"] / (time.perf_counter() - t0)
    return out


def _components(data: torch.Tensor) -> int:
    from kcd_fast.jpeg import read_jpeg_header

    header = read_jpeg_header(data)
    return header.components if header is not None else 0


# ---- (c) the steps they feed -----------------------------------------------------------------------

class Steps:
    """The KD step and the cached step of ResNet34 -> ResNet18 (SGD, AMP, channels_last)."""

    def __init__(self, classes: int, n: int):
        device = torch.device("cuda" if CUDA else "cpu")
        self.device, self.dtype = device, options.AMP_DTYPES[SIZE["amp"]]
        self.teacher = build_model(SIZE["teacher"], classes, 3).to(device, memory_format=torch.channels_last).eval()
        self.student = build_model(SIZE["student"], classes, 3).to(device, memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.9)
        self.buffer = torch.randn(n, classes, device=device).half()  # the cached soft labels' logits

    def step(self, x, y, index, cached: bool) -> None:
        from kcd_fast.distill import kl_distill

        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            if cached:
                t_logits = self.buffer[index.to(self.device, non_blocking=True)]
            else:
                with torch.no_grad():
                    t_logits = self.teacher(x)
            s_logits = self.student(x)
            loss = 0.1 * torch.nn.functional.cross_entropy(s_logits, y) + 0.9 * kl_distill(s_logits, t_logits, 4.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def step_time(steps: Steps, batches, cached: bool, workers: int = 0) -> float:
    """Seconds per step over the :func:`window` of ``steps`` steps fed by ``batches`` from ``workers``
    workers, after at least two warm-up steps."""
    first, count = window(workers, SIZE["steps"])
    it, clock, done = iter(batches), Clock(), 0
    for _, batch in zip(range(max(first, 2)), it):
        steps.step(*batch, cached=cached)
    clock.start()
    for _, batch in zip(range(count), it):
        steps.step(*batch, cached=cached)
        done += 1
    return clock.seconds() / max(done, 1)


IN_TURN = "_in_turn"  # a feed whose batches are prepared when the step asks for them, not ahead in a thread


def fed_steps(root: Path, teacher: Path, loaders_to_feed: list, classes: int) -> dict:
    """Each step's seconds on one device-resident batch and fed by each loader; on CUDA also fed by the
    ``gpu`` loader preparing each batch in turn (``gpu_in_turn``: what its thread buys)."""
    steps = Steps(classes, SIZE["n"])
    resident = next(loader_batches(root, teacher, "cpu", 0))
    feeds = [(f"{loader}_{workers}w", loader, workers, None) for loader, workers in loaders_to_feed]
    feeds += [(f"gpu{IN_TURN}_{workers}w", loader, workers, 0) for loader, workers in loaders_to_feed if loader == "gpu"]
    out = {}
    for cached in (False, True):
        name = "cached" if cached else "kd"
        out[name] = {"resident_s": step_time(steps, _repeat(resident), cached)}
        for key, loader, workers, ahead in feeds:
            batches = loader_batches(root, teacher, loader, workers, ahead)
            out[name][f"{key}_s"] = step_time(steps, batches, cached, workers)
    return out


def _repeat(batch):
    while True:
        yield batch


# ---- (d) whole runs ---------------------------------------------------------------------------------

def whole_runs(root: Path, teacher: Path, loader: str, tmp: Path) -> dict:
    """KD, KCD and cached KCD on the JPEG folders (``run_subset`` of the files, 0: all) with ``loader``,
    after a discarded warm-up run; each run's training time (the epochs' M-step + E-step), its ratio
    to KD and C."""
    s = SIZE
    common = trainer_args(root, teacher, loader, CORES, "--epochs", str(s["epochs"]), "--stage-epochs",
                          str(s["stage_epochs"]), "--lr-milestones", str(s["epochs"]), "--train-subset",
                          str(s["run_subset"]))
    warm = list(common)
    warm[warm.index("--epochs") + 1] = "2"
    run_trainer(options.get_args_parser().parse_args(warm + ["--output-dir", str(tmp / f"warm-{loader}")]))
    results = {}
    for name, extra in (("kd", ["--no-kcd"]), ("kcd", []), ("kcd_cached", ["--knowledge", "cached"])):
        out_dir = tmp / f"{loader}-{name}"
        summary = run_trainer(options.get_args_parser().parse_args(common + extra + ["--output-dir", str(out_dir)]))
        rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
        results[name] = {"train_time_s": sum(r["train_time"] for r in rows), "C": summary["C"],
                         "per_epoch_s": [r["train_time"] for r in rows]}
    for r in results.values():
        r["ratio_to_kd"] = r["train_time_s"] / results["kd"]["train_time_s"]
    return results


# ---- the whole benchmark -----------------------------------------------------------------------------

def environment() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
            "device": torch.cuda.get_device_name() if CUDA else "cpu", "cpu_cores": CORES,
            "torch": torch.__version__, "torchvision": torchvision.__version__}


def parse_parts(text: str) -> tuple:
    parts = tuple(x for x in text.split(",") if x)
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(PARTS)}, got {text!r}")
    return parts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=SIZE["n"], help="training JPEGs to write")
    p.add_argument("--classes", type=int, default=SIZE["classes"])
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the JPEG folders are kept: an existing train/ + val/ ImageFolder is read as it is, "
                        "else the synthetic files are written there (default: a temporary folder)")
    p.add_argument("--parts", type=parse_parts, default=PARTS, help=f"which parts to run, of {','.join(PARTS)}")
    p.add_argument("--loader-batches", type=int, default=None, help="batches timed per loader in (a)")
    p.add_argument("--repeats", type=int, default=1, help="passes of (a); the targets read the median pass")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and models: checks that every part runs")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.smoke:
        SIZE.update(SMOKE)
        args.n, args.classes = SMOKE["n"], SMOKE["classes"]
    if args.loader_batches:
        SIZE["loader_batches"] = args.loader_batches
    with tempfile.TemporaryDirectory() as tmp:
        root, t0 = args.data_dir or Path(tmp) / "imagenet", time.perf_counter()
        if (root / "train").is_dir():
            files = existing_folders(root)
        elif root.exists() and any(root.iterdir()):
            raise SystemExit(f"--data-dir: {root} holds files but no train/ folder; expected an ImageFolder "
                             f"(train/ and val/) or an empty or new folder to write the synthetic files into")
        else:
            files = write_folders(root, args.n, args.classes, SIZE["val_per_class"])
            files["write_s"] = time.perf_counter() - t0
        print(f"[loader] {root}: {files}", flush=True)
        SIZE["n"], classes = files["train"], files["classes"]
        out = environment() | {"size": dict(SIZE, classes=classes), "smoke": args.smoke, "files": files}
        teacher = Path(tmp) / "teacher.pth"  # random weights: the timings do not depend on them
        torch.manual_seed(0)
        torch.save(build_model(SIZE["teacher"], classes, 3).state_dict(), teacher)
        fast = ["cpu", "gpu"] if CUDA else ["cpu"]
        feeds = [("pil", min(8, CORES)), ("pil", CORES)] + [(name, CORES) for name in fast]
        run_loader = "gpu" if CUDA else "cpu"  # the default path of each kind of machine
        measures = {
            # (a) in --repeats passes, each over every loader in turn, so that drift weighs on all alike
            "loaders": lambda: [[loader_rate(root, teacher, loader, workers) for loader, workers in feeds]
                                for _ in range(args.repeats)],
            "decode_ceiling": lambda: decode_ceiling(root),
            "transforms": lambda: transform_rates(root),
            "steps": lambda: fed_steps(root, teacher, feeds, classes),
            "runs": lambda: {run_loader: whole_runs(root, teacher, run_loader, Path(tmp))},
        }
        for name in args.parts:  # the JSON is rewritten after each part: a deadline leaves the rest
            if name in CUDA_PARTS and not CUDA:
                continue
            out[name] = measures[name]()
            print(f"[loader] {name}: {out[name]}", flush=True)
            Path(args.out).write_text(json.dumps(out | {"targets": targets(out)}, indent=2))
    print(json.dumps(targets(out), indent=2))


def targets(out: dict) -> dict:
    """The figures the bounds read: the GPU loader against the cached step's consumption and against
    the decode ceiling, fed steps against resident ones, whole-run ratios, the CPU path against PIL."""
    t = {}
    if "loaders" in out:
        t |= loader_targets(out)
    if "transforms" in out:
        t["fused_transform_over_twin"] = out["transforms"]["fused_images_per_s"] / out["transforms"]["twin_images_per_s"]
    # A fed step takes max(the resident step, the loader's time per batch) at best: within 5% of
    # that bound either way (the loader fast enough, or the step waiting on it)
    rates = loader_rates(out) if "loaders" in out else {}
    for name, times in out.get("steps", {}).items():
        for key, seconds in times.items():
            if key != "resident_s":
                t[f"{name}_step_{key[:-2]}_over_resident"] = seconds / times["resident_s"]
                rate = rates.get(key[:-2].replace(IN_TURN, ""))  # the loader alone, either way of preparing
                if rate:
                    bound = max(times["resident_s"], out["size"]["batch"] / rate)
                    t[f"{name}_step_{key[:-2]}_over_bound"] = seconds / bound
    for loader, runs in out.get("runs", {}).items():
        t[f"runs_{loader}"] = {name: {"ratio_to_kd": r["ratio_to_kd"], "C": r["C"]} for name, r in runs.items()}
    return t


def loader_targets(out: dict) -> dict:
    """The loaders' bounds: the CPU path against PIL, and the GPU loader against the cached step's
    consumption and the decode ceiling (when measured)."""
    steps, workers = pass_rates(out, "images_per_s"), pass_rates(out, "workers_images_per_s")
    # cpu against pil with the same workers, the median pass: as the step takes the batches (on a
    # CPU-only machine that includes the normalisation), and as the workers deliver them (per core:
    # the same cores)
    cpu, pil = f"cpu_{CORES}w", f"pil_{CORES}w"
    t = {"cpu_over_pil_same_workers": statistics.median(r[cpu] / r[pil] for r in steps),
         "cpu_over_pil_workers_output": statistics.median(m[cpu] / m[pil] for m in workers)}
    if CUDA and "decode_ceiling" in out:
        gpu = loader_rates(out)[f"gpu_{CORES}w"]
        consumption, source = cached_step_consumption(out)
        t |= {"gpu_loader_images_per_s": gpu, "cached_step_images_per_s": consumption,
              "cached_step_images_per_s_from": source, "gpu_over_cached_step_consumption": gpu / consumption,
              "gpu_over_decode_ceiling": gpu / out["decode_ceiling"]["images_per_s"]}
    return t


def cached_step_consumption(out: dict) -> tuple[float, str]:
    """Images/s the cached step consumes, and where the figure comes from: this run's resident cached
    step (part (c)), or, before that part has run, the H200 figure of docs/performance.md."""
    cached = out.get("steps", {}).get("cached")
    if cached:
        return out["size"]["batch"] / cached["resident_s"], "measured"
    return float(CACHED_STEP_IMAGES_PER_S), "docs/performance.md (H200)"


def pass_rates(out: dict, field: str) -> list:
    """``field`` of each loader ("<loader>_<workers>w"), one dict per pass of (a)."""
    return [{f"{r['loader']}_{r['workers']}w": r.get(field) for r in one} for one in out["loaders"]]


def loader_rates(out: dict) -> dict:
    """Each loader's images/s as the step takes the batches, its median over the passes."""
    passes = pass_rates(out, "images_per_s")
    return {key: statistics.median(p[key] for p in passes) for key in passes[0]}


if __name__ == "__main__":
    main()
