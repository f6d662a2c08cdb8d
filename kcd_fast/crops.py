"""The ImageNet recipe's crops on decoded uint8 images, batched: reproducible draws and the transforms.

* :func:`random_resized_crop_boxes`: torchvision's ``RandomResizedCrop`` draws (and a horizontal flip
  per image), from a generator seeded by (seed, epoch, dataset index): a resumed run draws the same
  crops, whatever the batch composition or worker count. :func:`crop_draws` completes a loader
  worker's draws (:meth:`kcd_fast.jpeg.EncodedBatch.draws`) from the decoded shapes, host metadata
  even for CUDA tensors (no device sync).
* :func:`train_crops` and :func:`eval_crops`: the train and eval transforms, normalised to the AMP
  dtype (timm's convention: uint8 out of the loader, normalisation on the device). On CUDA one
  Triton launch does the batch (:func:`fused_crops`, its parameter rows from :func:`crop_table` and
  :func:`center_table`); the slow twin, also the CPU path, is torchvision's functions image by image
  (:func:`resized_crops`, :func:`flip_`, :func:`center_crops`, then :func:`normalize_to`).

CPU and CUDA tensors alike; :mod:`kcd_fast.jpeg` decodes the images these functions take.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
from torchvision.transforms.v2 import functional as F

from kcd_fast.data import IMAGENET_MEAN, IMAGENET_STD, mix_seed

__all__ = ["crop_seed", "crop_generator", "random_resized_crop_boxes", "crop_draws", "resized_crops", "flip_",
           "normalize_to", "center_crops", "resized_size", "CROP_PARAMS", "crop_table", "center_table", "fused_crops",
           "train_crops", "eval_crops"]


# --------------------------------------------------------------------------------------
# Reproducible crop and flip draws
# --------------------------------------------------------------------------------------

CROP_STREAM = 0xC20F  # separates these draws from other streams seeded by the same (seed, epoch)


def crop_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed hashed from (seed, epoch, dataset index)."""
    return mix_seed(CROP_STREAM, seed, epoch, index)


def crop_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The CPU generator the crop and flip of dataset item ``index`` in ``epoch`` are drawn from."""
    return torch.Generator().manual_seed(crop_seed(seed, epoch, index))


def draw_box(height: int, width: int, g: torch.Generator, scale, log_ratio, ratio) -> tuple:
    """torchvision's RandomResizedCrop draw, step for step, from ``g``: (top, left, h, w)."""
    area = height * width
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=g).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=g).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)  # ten misses: the centre crop, its ratio clamped
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_boxes(
    heights: Sequence[int],
    widths: Sequence[int],
    seed: int,
    epoch: int,
    indices: Sequence[int],
    scale: tuple = (0.08, 1.0),
    ratio: tuple = (3.0 / 4.0, 4.0 / 3.0),
    flip_p: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop boxes and flips of a batch: (int64 [B, 4] rows (top, left, height, width), bool [B]).

    Item ``k`` (image of ``heights[k]`` x ``widths[k]``, dataset index ``indices[k]``) draws from
    :func:`crop_generator`, as ``v2.Compose([v2.RandomResizedCrop(..., scale, ratio),
    v2.RandomHorizontalFlip(flip_p)])`` would from a global RNG seeded the same: the box by
    torchvision's algorithm, then the flip (``rand < flip_p``).
    """
    heights, widths, indices = (torch.as_tensor(v).tolist() for v in (heights, widths, indices))
    if not len(heights) == len(widths) == len(indices):
        raise ValueError(
            f"heights, widths and indices must have one entry per image, got {len(heights)}, {len(widths)} "
            f"and {len(indices)}"
        )
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"scale and ratio must be (low, high) with 0 < low <= high, got {scale} and {ratio}")
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision keeps it
    boxes = torch.empty(len(indices), 4, dtype=torch.int64)
    flips = torch.empty(len(indices), dtype=torch.bool)
    for k, (h, w, index) in enumerate(zip(heights, widths, indices)):
        if h < 1 or w < 1:
            raise ValueError(f"image {k} (index {index}) must have a positive size, got {h} x {w}")
        g = crop_generator(seed, epoch, index)
        boxes[k] = torch.tensor(draw_box(h, w, g, scale, log_ratio, ratio))
        flips[k] = bool(torch.rand(1, generator=g) < flip_p)
    return boxes, flips


def crop_draws(images: Sequence[torch.Tensor], seed: int, epoch: int, indices, drawn=None) -> tuple:
    """The boxes and flips of ``images`` (decoded) for ``epoch``: ``drawn``
    (:meth:`kcd_fast.jpeg.EncodedBatch.draws`) where drawn for the size the image has, drawn here
    (:func:`random_resized_crop_boxes`) for the rest."""
    sizes = torch.tensor([list(img.shape[-2:]) for img in images], dtype=torch.int64).reshape(-1, 2)  # host metadata
    if drawn is None:
        return random_resized_crop_boxes(sizes[:, 0], sizes[:, 1], seed, epoch, indices)
    boxes, flips, drawn_for = drawn[0].clone(), drawn[1].clone(), drawn[2]
    rest = (drawn_for != sizes).any(1).nonzero().flatten()
    if len(rest):
        boxes[rest], flips[rest] = random_resized_crop_boxes(sizes[rest, 0], sizes[rest, 1], seed, epoch,
                                                             torch.as_tensor(indices)[rest])
    return boxes, flips


# --------------------------------------------------------------------------------------
# Batched transforms: CPU or CUDA tensors alike
# --------------------------------------------------------------------------------------


def resized_crops(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int = 224,
                  antialias: bool = True) -> torch.Tensor:
    """Crop box ``boxes[k]`` (top, left, height, width) of ``images[k]`` and resize it to ``size`` x
    ``size`` (bilinear): [B, C, size, size] in the images' dtype and device."""
    if boxes.shape != (len(images), 4):
        raise ValueError(f"boxes must be [{len(images)}, 4] (one row per image), got {tuple(boxes.shape)}")
    out = [F.resized_crop(img, top, left, h, w, [size, size], antialias=antialias)
           for img, (top, left, h, w) in zip(images, boxes.tolist())]
    return torch.stack(out)


def flip_(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flip the images ``x[k]`` (along width) where ``mask[k]``, in place; returns ``x``."""
    if mask.shape != x.shape[:1]:
        raise ValueError(f"mask must be [{len(x)}] (one flag per image), got {tuple(mask.shape)}")
    idx = mask.cpu().nonzero().squeeze(1)  # masks come from the CPU draws: no device sync
    if x.device.type == "cpu":  # image by image: each stays in cache (several times faster than a gather)
        for k in idx.tolist():
            x[k] = x[k].flip(-1)
    elif len(idx):  # on a GPU: one gather and one scatter instead of a launch per image
        idx = idx.to(x.device, non_blocking=True)
        x[idx] = x[idx].flip(-1)
    return x


@functools.lru_cache(maxsize=16)
def channel_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as float32 [C, 1, 1] tensors on ``device``, made once per device: a tensor
    built from host numbers is copied to a GPU synchronously, which must not happen at every step."""
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1))


def normalize_to(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype: torch.dtype = torch.float32,
                 channels_last: bool = True) -> torch.Tensor:
    """uint8 [B, C, H, W] -> ``(x / 255 - mean) / std`` in ``dtype`` (computed in float32), channels-last
    by default (what convolutions under AMP prefer)."""
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"x must be a uint8 [B, C, H, W] tensor, got {x.dtype} {tuple(x.shape)}")
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(f"mean and std must have {x.shape[1]} entries (one per channel), got {len(mean)}, {len(std)}")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    mean_t, std_t = channel_constants(tuple(mean), tuple(std), x.device)
    if x.device.type != "cpu":  # one pass over the batch: a few kernels
        y = x.to(dtype=torch.float32, memory_format=fmt).div_(255.0).sub_(mean_t).div_(std_t)
        return y if dtype == torch.float32 else y.to(dtype)
    y = torch.empty(x.shape, dtype=dtype, memory_format=fmt)
    for k in range(len(x)):  # image by image on the CPU: the float temporaries stay in cache
        y[k] = x[k].to(torch.float32).div_(255.0).sub_(mean_t).div_(std_t)
    return y


def center_crops(images: Sequence[torch.Tensor], resize: int = 256, size: int = 224,
                 antialias: bool = True) -> torch.Tensor:
    """The eval transform: shorter side to ``resize``, then the centre ``size`` x ``size``: [B, C, size, size]."""
    out = [F.center_crop(F.resize(img, [resize], antialias=antialias), [size, size]) for img in images]
    return torch.stack(out)


def resized_size(height: int, width: int, resize: int) -> tuple[int, int]:
    """The size ``v2.Resize(resize)`` gives an image: the shorter side ``resize``, the longer one scaled
    and truncated, as torchvision computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resize * long / short)
    return (new_long, resize) if width <= height else (resize, new_long)


# The fused kernel's parameter row per image (kcd_fast.kernels.resized_crop reads these columns): the
# image's byte offset in the flat batch (filled at launch), its size, the box, the size the box is
# resized to, the offset read at in that resized box, and the flip.
CROP_PARAMS = ("offset", "height", "width", "top", "left", "box_h", "box_w", "resize_h", "resize_w",
               "out_top", "out_left", "flip")


def param_table(**columns) -> torch.Tensor:
    """int64 [B, len(CROP_PARAMS)] from named columns (each [B] or a number; absent ones 0)."""
    unknown = set(columns) - set(CROP_PARAMS)
    if unknown:
        raise ValueError(f"columns must be among {CROP_PARAMS}, got {sorted(unknown)}")
    n = max((len(v) for v in columns.values() if isinstance(v, (torch.Tensor, list))), default=0)
    table = torch.zeros(n, len(CROP_PARAMS), dtype=torch.int64)
    for name, value in columns.items():
        table[:, CROP_PARAMS.index(name)] = torch.as_tensor(value, dtype=torch.int64)
    return table


def crop_table(images: Sequence[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """The fused kernel's :data:`CROP_PARAMS` rows of the train transform: box ``boxes[k]`` of
    ``images[k]`` resized to ``size`` x ``size``, flipped where ``flips[k]``."""
    top, left, box_h, box_w = boxes.to(torch.int64).reshape(-1, 4).unbind(1)
    return param_table(height=[img.shape[-2] for img in images], width=[img.shape[-1] for img in images],  # host
                       top=top, left=left, box_h=box_h, box_w=box_w, resize_h=size, resize_w=size, flip=flips)


def center_table(images: Sequence[torch.Tensor], resize: int, size: int) -> torch.Tensor:
    """The :data:`CROP_PARAMS` rows of the eval transform: each whole image resized as
    ``v2.Resize(resize)`` does, read at ``v2.CenterCrop(size)``'s offset."""
    heights, widths = [img.shape[-2] for img in images], [img.shape[-1] for img in images]  # host metadata
    resized = [resized_size(h, w, resize) for h, w in zip(heights, widths)]
    if any(rh < size or rw < size for rh, rw in resized):
        raise ValueError(f"resize must be >= size so the centre crop lies inside, got {resize} and {size}")
    return param_table(height=heights, width=widths, box_h=heights, box_w=widths,
                       resize_h=[rh for rh, _ in resized], resize_w=[rw for _, rw in resized],
                       out_top=[int(round((rh - size) / 2.0)) for rh, _ in resized],
                       out_left=[int(round((rw - size) / 2.0)) for _, rw in resized])


def fused_crops(images: Sequence[torch.Tensor], table: torch.Tensor, size: int, dtype: torch.dtype,
                mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Every image's row of ``table`` in one Triton launch (``kcd_fast.kernels.resized_crop``): the
    batch [B, 3, size, size], channels-last, normalised in ``dtype`` (uint8: the resized pixels)."""
    for k, img in enumerate(images):
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"images[{k}] must be a uint8 [3, H, W] tensor, got {img.dtype} {tuple(img.shape)}")
    from kcd_fast.kernels.resized_crop import resized_crops_triton  # imports triton: only when used

    device = images[0].device if len(images) else torch.device("cpu")
    out = torch.empty(len(images), 3, size, size, dtype=dtype, device=device, memory_format=torch.channels_last)
    return resized_crops_triton(images, table, size, out, mean, std)


def train_crops(images: Sequence[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int = 224,
                dtype: torch.dtype = torch.float32, fused: Optional[bool] = None) -> torch.Tensor:
    """The train transform of decoded uint8 images: crop, resize, flip, normalise (channels-last, ``dtype``).
    ``fused`` (default: on CUDA) runs :func:`fused_crops`; else its slow twin, torchvision's functions
    image by image (:func:`resized_crops`, :func:`flip_`, :func:`normalize_to`)."""
    if boxes.shape != (len(images), 4) or flips.shape != (len(images),):
        raise ValueError(f"boxes must be [{len(images)}, 4] and flips [{len(images)}] (one row per image), "
                         f"got {tuple(boxes.shape)} and {tuple(flips.shape)}")
    if fused is None:
        fused = len(images) > 0 and images[0].is_cuda
    if fused:
        return fused_crops(images, crop_table(images, boxes, flips, size), size, dtype)
    return normalize_to(flip_(resized_crops(images, boxes, size), flips), dtype=dtype)


def eval_crops(images: Sequence[torch.Tensor], resize: int = 256, size: int = 224,
               dtype: torch.dtype = torch.float32, fused: Optional[bool] = None) -> torch.Tensor:
    """The eval transform (shorter side to ``resize``, centre ``size`` x ``size``, normalise); ``fused``
    as in :func:`train_crops`, the twin :func:`center_crops` + :func:`normalize_to`."""
    if fused is None:
        fused = len(images) > 0 and images[0].is_cuda
    if fused:
        return fused_crops(images, center_table(images, resize, size), size, dtype)
    return normalize_to(center_crops(images, resize, size), dtype=dtype)
