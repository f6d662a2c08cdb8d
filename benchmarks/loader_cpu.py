"""Images per second and CPU core of the ImageNet train input path: PIL per image against kcd_fast.jpeg.

It writes ``--n`` synthetic ImageNet-like JPEGs (500 x 375 on average, each side drawn within +-20%,
quality 90) into a temporary ImageFolder tree and times, in one process with one torch thread:

* ``pil_v2`` (today's path): item ``i`` of ``build_datasets("imagenet", ...).train``, i.e. the PIL
  loader of kcd_fast.data, then v2 RandomResizedCrop(224) + RandomHorizontalFlip + ToDtype(float32) +
  Normalize, per image;
* ``bytes_decode_crop`` (the new CPU path): ``FileBytesDataset`` reads the bytes, ``decode_batch`` decodes
  a batch with ``decode_jpeg`` on the CPU, crop boxes are drawn from (seed, epoch, index), then
  ``resized_crops`` + ``flip_`` on uint8. Normalisation (``normalize_to``) is timed on its own as
  ``normalize``: on a GPU machine it runs on the device.

The content is photograph-like for the encoder: value noise at three scales (cells of 64, 16 and 4
pixels, bicubic-upsampled), a colour gradient and a fine grain, so a file is 80-100 KB (ImageNet's
average is about 110 KB). A pass times both paths batch by batch in turn, so that drift in the
machine's load weighs on both alike; of ``--repeats`` passes, the one of median ratio is reported
(all ratios are listed). The JSON holds the date, commit, versions, CPU, N and ms/image by stage.

    python benchmarks/loader_cpu.py --n 300 --out /tmp/loader_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from kcd_fast import crops, jpeg
from kcd_fast.data import build_datasets

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.4  # pil_v2 ms over bytes_decode_crop ms


def synthetic_photo(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [h, w, 3]: multi-scale smooth noise + a gradient + grain, which JPEG compresses like a photo."""
    img = np.zeros((h, w, 3), np.float32)
    for cell, amp in ((64, 70), (16, 40), (4, 25)):
        low = (rng.random((h // cell + 2, w // cell + 2, 3)) * 255).astype(np.uint8)
        up = Image.fromarray(low).resize(((w // cell + 2) * cell, (h // cell + 2) * cell), Image.BICUBIC)
        img += (np.asarray(up, np.float32)[:h, :w] - 128) * (amp / 128)
    yy, xx = np.mgrid[0:h, 0:w]
    img += 128 + 40 * (xx / w)[..., None] - 30 * (yy / h)[..., None]
    img += rng.normal(0, 13, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_folder(root: Path, n: int, seed: int = 0) -> float:
    """An ImageFolder tree root/{train,val}/c<k>/ (10 classes) with n train and 10 val JPEGs; mean train KB."""
    rng = np.random.default_rng(seed)
    total = 0
    for split, count in (("train", n), ("val", 10)):
        for i in range(count):
            folder = root / split / f"c{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = int(375 * rng.uniform(0.8, 1.2)), int(500 * rng.uniform(0.8, 1.2))
            path = folder / f"{i:06d}.JPEG"
            Image.fromarray(synthetic_photo(h, w, rng)).save(path, "JPEG", quality=90)
            total += path.stat().st_size if split == "train" else 0
    return total / n / 1e3


def time_pil_v2(dataset, start: int, stop: int) -> float:
    """Seconds of today's per-item path over items start..stop-1."""
    t0 = time.perf_counter()
    for i in range(start, stop):
        dataset[i]
    return time.perf_counter() - t0


def time_new(dataset, start: int, stop: int) -> dict:
    """Seconds of the byte/decode/crop path over items start..stop-1 (one batch), by stage, and of
    normalisation on its own; and the fallback count."""
    t0 = time.perf_counter()
    data, labels, indices = jpeg.collate_bytes([dataset[i] for i in range(start, stop)])
    t1 = time.perf_counter()
    images, fallback = jpeg.decode_batch(data, "cpu")
    t2 = time.perf_counter()
    boxes, flips = crops.random_resized_crop_boxes([im.shape[-2] for im in images], [im.shape[-1] for im in images],
                                                  0, 0, indices)
    x = crops.flip_(crops.resized_crops(images, boxes), flips)
    t3 = time.perf_counter()
    crops.normalize_to(x)
    t4 = time.perf_counter()
    return dict(read=t1 - t0, decode=t2 - t1, crop=t3 - t2, normalize=t4 - t3, fallbacks=fallback)


def time_pass(today, files, n: int, batch: int) -> dict:
    """ms per image of both paths over n items, batch by batch in turn, so that both see the same load."""
    torch.manual_seed(0)
    total = dict(pil_v2=0.0, read=0.0, decode=0.0, crop=0.0, normalize=0.0, fallbacks=0)
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        total["pil_v2"] += time_pil_v2(today, start, stop)
        for key, value in time_new(files, start, stop).items():
            total[key] += value
    out = {key: (v if key == "fallbacks" else v / n * 1e3) for key, v in total.items()}
    out["bytes_decode_crop"] = out["read"] + out["decode"] + out["crop"]
    out["ratio"] = out["pil_v2"] / out["bytes_decode_crop"]
    return out


def describe() -> dict:
    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=commit, cpu=cpu,
                python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
                pillow=Image.__version__)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="number of synthetic train JPEGs")
    p.add_argument("--batch", type=int, default=64, help="images per decode_batch call")
    p.add_argument("--repeats", type=int, default=3, help="timed passes (the one of median ratio is reported)")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    for name in ("n", "batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        kb = write_folder(Path(tmp), args.n)
        today = build_datasets("imagenet", tmp).train
        files = jpeg.FileBytesDataset(today.samples)
        time_pass(today, files, min(args.batch, args.n), args.batch)  # warm-up: imports, allocator, page cache
        passes = [time_pass(today, files, args.n, args.batch) for _ in range(args.repeats)]
    mid = sorted(passes, key=lambda r: r["ratio"])[(len(passes) - 1) // 2]  # the pass of median (low) ratio
    ms = {key: mid[key] for key in ("pil_v2", "read", "decode", "crop", "normalize", "bytes_decode_crop")}
    result = dict(describe(), n=args.n, batch=args.batch, repeats=args.repeats, mean_file_kb=round(kb, 1),
                  threads=torch.get_num_threads(), fallbacks=mid["fallbacks"], ms_per_image=ms,
                  ratio=mid["ratio"], ratio_each=[r["ratio"] for r in passes],
                  ratio_with_cpu_normalize=ms["pil_v2"] / (ms["bytes_decode_crop"] + ms["normalize"]),
                  images_per_s_per_core={"pil_v2": 1e3 / ms["pil_v2"], "bytes_decode_crop": 1e3 / ms["bytes_decode_crop"]},
                  target_ratio=TARGET_RATIO)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
