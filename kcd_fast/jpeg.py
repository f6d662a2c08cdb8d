"""A JPEG input path: loader workers read file bytes, the main process decodes and augments batches.

The pieces, in the order a training step uses them:

* :class:`FileBytesDataset` and :func:`collate_bytes`: an item is ``(uint8 1-D tensor of the file's
  bytes, label, index)``; a batch keeps the byte tensors as a list (they differ in length).
* :func:`decode_batch`: one batched ``torchvision.io.decode_jpeg`` call on ``device`` ("cuda" on a
  GPU machine, "cpu" otherwise), with a per-file PIL fallback for what it cannot decode (data that is
  not a JPEG, e.g. PNG bytes behind a .JPEG name; on CUDA also 4-component CMYK/YCCK JPEGs, which
  nvjpeg does not convert), counted. A file neither decodes raises
  :class:`kcd_fast.data.CorruptImageError` naming it, as the PIL loader of :mod:`kcd_fast.data` does.
* :func:`random_resized_crop_boxes`: torchvision's ``RandomResizedCrop`` draws (and a horizontal flip
  per image), from a generator seeded by (seed, epoch, dataset index): a resumed run draws the same
  crops, whatever the batch composition or worker count.
* :func:`train_crops` and :func:`eval_crops`: the train and eval transforms of the ImageNet recipe on
  decoded uint8 images, normalised to the AMP dtype (timm's convention: uint8 out of the loader,
  normalisation on the device). On CUDA one Triton launch does the batch (:func:`fused_crops`); the
  slow twin, also the CPU path, is torchvision's functions image by image (:func:`resized_crops`,
  :func:`flip_`, :func:`center_crops`, then :func:`normalize_to`).

Box coordinates are needed on the host. :func:`read_jpeg_header` parses the SOF marker for (height,
width, components) without decoding: :func:`decode_batch` routes files by it, and a loader worker
draws each crop from it (:func:`describe_file`) and hands its batch over as an :class:`EncodedBatch`.
:func:`crop_draws` draws what the worker could not from the decoded shapes, host metadata even for
CUDA tensors (no device sync).
"""

from __future__ import annotations

import functools
import io
import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from kcd_fast.data import IMAGENET_MEAN, IMAGENET_STD, CorruptImageError

__all__ = ["FileBytesDataset", "collate_bytes", "EncodedBatch", "describe_file", "crop_draws", "JpegHeader",
           "read_jpeg_header", "decodes_on_device", "on_stream", "on_decode_stream", "decode_batch", "crop_generator",
           "random_resized_crop_boxes", "resized_crops", "flip_", "normalize_to", "center_crops",
           "resized_size", "crop_table", "center_table", "fused_crops", "train_crops", "eval_crops",
           "train_batch", "eval_batch"]

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------
# Loader side: file bytes only
# --------------------------------------------------------------------------------------


class FileBytesDataset(Dataset):
    """``samples`` as (path, label) pairs; item ``i`` is ``(uint8 [n_bytes] tensor, label, i)``.

    The worker only reads the file: decoding and augmentation happen on whole batches in the main
    process. ``samples`` may be an ImageFolder's ``.samples``; :meth:`from_folder` builds one.
    """

    def __init__(self, samples: Sequence[tuple[PathLike, int]]):
        self.samples = [(str(p), int(y)) for p, y in samples]

    @classmethod
    def from_folder(cls, root: PathLike) -> "FileBytesDataset":
        """The images of an ImageFolder tree ``root/<class>/<file>``, labelled as ImageFolder does."""
        from torchvision.datasets import ImageFolder

        return cls(ImageFolder(str(root)).samples)

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, i: int) -> str:
        """The file of item ``i`` (for error messages)."""
        return self.samples[i][0]

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with open(path, "rb") as f:  # read straight into the buffer the tensor wraps: one copy
            buf = bytearray(os.fstat(f.fileno()).st_size)
            n = f.readinto(buf)
        tensor = torch.frombuffer(buf, dtype=torch.uint8)[:n] if n else torch.empty(0, dtype=torch.uint8)
        return tensor, label, int(i)

    def __repr__(self) -> str:
        return f"FileBytesDataset(n={len(self)})"


def collate_bytes(items):
    """[(bytes, label, index), ...] -> (list of uint8 byte tensors, int64 labels [B], int64 indices [B])."""
    data, labels, indices = zip(*items)
    return list(data), torch.tensor(labels, dtype=torch.int64), torch.tensor(indices, dtype=torch.int64)


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JpegHeader:
    """What the SOF marker of a JPEG says: size, number of colour components, progressive or not."""

    height: int
    width: int
    components: int
    progressive: bool


# SOF markers: C0-CF except C4 (DHT), C8 (JPG extension) and CC (DAC). C2, C6, CA, CE are progressive.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
STANDALONE_MARKERS = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM: no length field


def read_jpeg_header(data: Union[bytes, torch.Tensor]) -> Optional[JpegHeader]:
    """The SOF header of JPEG ``data`` (bytes or a uint8 1-D tensor), or None when ``data`` is not a
    JPEG (no SOI marker), ends before its SOF marker, or declares a zero size (DNL-defined height)."""
    buf = memoryview(data.numpy()) if isinstance(data, torch.Tensor) else memoryview(data)
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= n:
        if buf[pos] != 0xFF:
            return None
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in STANDALONE_MARKERS:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or start of scan before any SOF
            return None
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        if marker in SOF_MARKERS:
            if pos + 10 > n:
                return None
            height = (buf[pos + 5] << 8) | buf[pos + 6]
            width = (buf[pos + 7] << 8) | buf[pos + 8]
            if height == 0 or width == 0:
                return None
            return JpegHeader(height, width, buf[pos + 9], marker in PROGRESSIVE_SOF)
        pos += 2 + length
    return None


def decodes_on_device(header: Optional[JpegHeader], device: Union[str, torch.device]) -> bool:
    """Whether batched ``decode_jpeg`` on ``device`` takes this file: any JPEG on the CPU (libjpeg-turbo
    converts grayscale and CMYK to RGB), 1- or 3-component JPEGs on CUDA (nvjpeg has no CMYK path)."""
    if header is None:
        return False
    return torch.device(device).type == "cpu" or header.components in (1, 3)


PIL_MODES = {ImageReadMode.RGB: "RGB", ImageReadMode.GRAY: "L"}


def pil_decode(data: torch.Tensor, mode: ImageReadMode, name: str) -> torch.Tensor:
    """CPU fallback: any format PIL reads -> uint8 [C, H, W]; CorruptImageError naming ``name`` if none."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            arr = np.array(im.convert(PIL_MODES[mode]))
    except UnidentifiedImageError:  # PIL names the object it read: the file's name, as opening the path gives
        raise CorruptImageError(f"cannot decode the image {name}: cannot identify image file {name!r}") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: truncated (OSError), unidentified, bad headers
        raise CorruptImageError(f"cannot decode the image {name}: {exc}") from None
    return torch.from_numpy(arr).unsqueeze(0) if arr.ndim == 2 else torch.from_numpy(arr).permute(2, 0, 1)


def decode_each(data: list, device: torch.device, mode: ImageReadMode) -> list:
    """``decode_jpeg`` file by file: each image, or None where it raises (found after a batch failed)."""
    out = []
    for d in data:
        try:
            out.append(decode_jpeg(d, mode=mode, device=device))
        except RuntimeError:
            out.append(None)
    return out


def on_stream(stream, work, *args):
    """``work(*args)`` queued on the CUDA ``stream``; the current stream then waits for it on the device
    (no host sync), and the CUDA tensors among its outputs (a sequence) are marked as used there, so
    their memory is not reused while the current stream reads them. ``stream`` None: just the call."""
    if stream is None:
        return work(*args)
    with torch.cuda.stream(stream):
        out = work(*args)
    current = torch.cuda.current_stream(stream.device)
    current.wait_stream(stream)
    for t in out:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            t.record_stream(current)
    return out


_DECODE_STREAMS: dict = {}  # device -> the stream that decode_jpeg runs on there


def on_decode_stream(decode, device: torch.device) -> list:
    """``decode()`` (images, or None for a file it could not read) :func:`on_stream` of a stream that
    holds no other work, on a CUDA ``device``.

    Why: torchvision's CUDA decoder allocates its outputs on the current stream but writes them from a
    stream of its own that does not wait for the current one. The caching allocator hands out a block
    freed on the current stream at once (later use is assumed to be ordered on that stream), so the
    decoder could overwrite memory that kernels queued there are still reading, e.g. the previous
    batch's crops. On a stream of its own it only gets blocks whose readers were recorded and are done."""
    if device.type != "cuda":
        return decode()
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _DECODE_STREAMS:
        _DECODE_STREAMS[device] = torch.cuda.Stream(device)
    return on_stream(_DECODE_STREAMS[device], decode)


def decode_batch(
    byte_list: Union[Sequence[torch.Tensor], "EncodedBatch"],
    device: Union[str, torch.device],
    mode: ImageReadMode = ImageReadMode.RGB,
    names: Optional[Sequence[str]] = None,
) -> tuple[list, int]:
    """Decode a batch of encoded images to uint8 [C, H, W] tensors on ``device``.

    One batched ``decode_jpeg`` call takes every file :func:`decodes_on_device` accepts; if it raises,
    those files are decoded one by one. The rest, and files ``decode_jpeg`` fails on, go through PIL on
    the CPU and are then moved to ``device``. Returns ``(images, fallback_count)``, images in input
    order. ``names`` (e.g. file paths) name a file that neither decoder reads in the
    :class:`CorruptImageError`; by default "item <k> of the batch". An :class:`EncodedBatch` brings the
    headers its loader worker read.
    """
    if mode not in PIL_MODES:
        raise ValueError(f"mode must be ImageReadMode.RGB or ImageReadMode.GRAY, got {mode}")
    headers = None
    if isinstance(byte_list, EncodedBatch):  # before counting files: an EncodedBatch is a pair of tensors
        byte_list, headers = byte_list.files(), byte_list.headers()
    if names is not None and len(names) != len(byte_list):
        raise ValueError(f"names must have one entry per file ({len(byte_list)}), got {len(names)}")
    device = torch.device(device)
    if headers is None:
        headers = [read_jpeg_header(d) for d in byte_list]
    fast = [k for k, h in enumerate(headers) if decodes_on_device(h, device)]
    images: list = [None] * len(byte_list)
    if fast:
        batch = [byte_list[k] for k in fast]

        def decode():
            try:
                return decode_jpeg(batch, mode=mode, device=device)
            except RuntimeError:  # one bad file fails the whole call: find it
                return decode_each(batch, device, mode)

        decoded = on_decode_stream(decode, device)
        for k, img in zip(fast, decoded):
            images[k] = img
    fallback = [k for k, img in enumerate(images) if img is None]
    for k in fallback:
        name = names[k] if names is not None else f"item {k} of the batch"
        images[k] = pil_decode(byte_list[k], mode, name).to(device, non_blocking=True)
    return images, len(fallback)


# --------------------------------------------------------------------------------------
# A batch of files as two tensors
# --------------------------------------------------------------------------------------

# The columns of EncodedBatch.table: each file's byte count, its SOF header (components 0: none read),
# and the crop box and flip a worker drew from that header (box_h 0: none drawn).
ENCODED_COLUMNS = ("length", "height", "width", "components", "progressive", "top", "left", "box_h", "box_w", "flip")


def describe_file(data: torch.Tensor, seed: Optional[int] = None, epoch: Optional[int] = None,
                  index: Optional[int] = None) -> tuple:
    """A file's :data:`ENCODED_COLUMNS` row: its header, and with ``seed``/``epoch``/``index`` its crop box
    and flip drawn as :func:`random_resized_crop_boxes` draws them from the header's size (what the
    decoded image will have: ``decode_jpeg`` and PIL ignore EXIF orientation here)."""
    header = read_jpeg_header(data)
    if header is None:
        return (len(data),) + (0,) * 9
    box, flip = (0, 0, 0, 0), 0
    if seed is not None:
        boxes, flips = random_resized_crop_boxes([header.height], [header.width], seed, epoch, [index])
        box, flip = tuple(boxes[0].tolist()), int(flips[0])
    return (len(data), header.height, header.width, header.components, int(header.progressive)) + box + (flip,)


class EncodedBatch(NamedTuple):
    """A batch of encoded files as a loader worker hands it over: ``data``, every file's bytes one after
    another (uint8 [total]), and ``table``, one :data:`ENCODED_COLUMNS` row per file (int64 [B, 10]).
    Two tensors cross from the worker, two shared-memory segments, instead of one per file."""

    data: torch.Tensor
    table: torch.Tensor

    @classmethod
    def pack(cls, files: Sequence[torch.Tensor], rows: Sequence[tuple]) -> "EncodedBatch":
        # NumPy's concatenate is one memcpy a file; torch.cat of many small uint8 tensors, several
        # times slower where intra-op threads compete (a loader without workers)
        if not len(files):
            return cls(torch.empty(0, dtype=torch.uint8), torch.empty(0, len(ENCODED_COLUMNS), dtype=torch.int64))
        data = torch.from_numpy(np.concatenate([f.numpy() for f in files]))
        return cls(data, torch.tensor(rows, dtype=torch.int64).reshape(-1, len(ENCODED_COLUMNS)))

    def files(self) -> list:
        """Each file's bytes: views of ``data``."""
        return list(torch.split(self.data, self.table[:, 0].tolist()))

    def headers(self) -> list:
        return [JpegHeader(h, w, c, bool(p)) if c else None for h, w, c, p in self.table[:, 1:5].tolist()]

    def draws(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The worker's draws: boxes int64 [B, 4], flips bool [B], and the header sizes int64 [B, 2] they
        were drawn for (0 where none was)."""
        return self.table[:, 5:9], self.table[:, 9].bool(), self.table[:, 1:3] * (self.table[:, 7:8] > 0)


def crop_draws(images: Sequence[torch.Tensor], seed: int, epoch: int, indices, drawn=None) -> tuple:
    """The boxes and flips of ``images`` (decoded) for ``epoch``: ``drawn`` (:meth:`EncodedBatch.draws`)
    where drawn for the size the image has, drawn here (:func:`random_resized_crop_boxes`) for the rest."""
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
# Reproducible crop and flip draws
# --------------------------------------------------------------------------------------

MASK64 = (1 << 64) - 1
CROP_STREAM = 0xC20F  # separates these draws from other streams seeded by the same (seed, epoch)


def splitmix64(x: int) -> int:
    """One step of the splitmix64 mixer (a bijection on 64-bit integers)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def crop_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed hashed from (seed, epoch, dataset index)."""
    h = 0x243F6A8885A308D3
    for v in (CROP_STREAM, seed, epoch, index):
        h = splitmix64(h ^ (int(v) & MASK64))
    return h >> 1


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


def crop_table(images: Sequence[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """The fused kernel's parameter rows (``kcd_fast.kernels.resized_crop.PARAMS``) of the train
    transform: box ``boxes[k]`` of ``images[k]`` resized to ``size`` x ``size``, flipped where ``flips[k]``."""
    table = torch.zeros(len(images), 12, dtype=torch.int64)
    table[:, 1] = torch.tensor([img.shape[-2] for img in images], dtype=torch.int64)  # host metadata
    table[:, 2] = torch.tensor([img.shape[-1] for img in images], dtype=torch.int64)
    table[:, 3:7] = boxes
    table[:, 7:9] = size
    table[:, 11] = flips
    return table


def center_table(images: Sequence[torch.Tensor], resize: int, size: int) -> torch.Tensor:
    """The parameter rows of the eval transform: each whole image resized as ``v2.Resize(resize)`` does,
    read at ``v2.CenterCrop(size)``'s offset."""
    rows = []
    for img in images:
        h, w = img.shape[-2:]
        rh, rw = resized_size(h, w, resize)
        if rh < size or rw < size:
            raise ValueError(f"resize must be >= size so the centre crop lies inside, got {resize} and {size}")
        rows.append((0, h, w, 0, 0, h, w, rh, rw, int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0)), 0))
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 12)


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


def train_batch(byte_list, indices, seed: int, epoch: int, device, dtype: torch.dtype = torch.float32,
                size: int = 224, names=None, fused: Optional[bool] = None) -> tuple[torch.Tensor, int]:
    """Encoded images (a list of byte tensors, or an :class:`EncodedBatch` with the workers' draws) -> the
    normalised train batch [B, 3, size, size] on ``device`` and the fallback count: decode, crop boxes
    drawn from (seed, epoch, indices), then :func:`train_crops`."""
    images, fallback = decode_batch(byte_list, device, names=names)
    drawn = byte_list.draws() if isinstance(byte_list, EncodedBatch) else None
    boxes, flips = crop_draws(images, seed, epoch, indices, drawn)
    return train_crops(images, boxes, flips, size, dtype, fused), fallback


def eval_batch(byte_list, device, dtype: torch.dtype = torch.float32, resize: int = 256, size: int = 224,
               names=None, fused: Optional[bool] = None) -> tuple[torch.Tensor, int]:
    """Encoded images (a list or an :class:`EncodedBatch`) -> the normalised eval batch [B, 3, size, size]
    on ``device`` and the fallback count."""
    images, fallback = decode_batch(byte_list, device, names=names)
    return eval_crops(images, resize, size, dtype, fused), fallback
