"""A JPEG input path: loader workers read file bytes, the main process decodes and augments batches.

The pieces, in the order a training step uses them:

* :class:`FileBytesDataset` and :func:`collate_bytes`: an item is ``(uint8 1-D tensor of the file's
  bytes, label, index)``; a batch keeps the byte tensors as a list (they differ in length).
* :func:`decode_batch`: one batched ``torchvision.io.decode_jpeg`` call on ``device`` ("cuda" on a
  GPU machine, "cpu" otherwise), with a per-file PIL fallback for what it cannot decode (data that is
  not a JPEG, e.g. PNG bytes behind a .JPEG name; on CUDA also 4-component CMYK/YCCK JPEGs, which
  nvjpeg does not convert), counted. A file neither decodes raises
  :class:`kcd_fast.data.CorruptImageError` naming it, as the PIL loader of :mod:`kcd_fast.data` does.
* :func:`train_batch` and :func:`eval_batch`: decode, then the ImageNet recipe's crops of
  :mod:`kcd_fast.crops` (reproducible draws; one Triton launch per batch on CUDA), normalised to the
  AMP dtype.

Box coordinates are needed on the host. :func:`read_jpeg_header` parses the SOF marker for (height,
width, components) without decoding: :func:`decode_batch` routes files by it, and a loader worker
draws each crop from it (:func:`describe_file`) and hands its batch over as an :class:`EncodedBatch`.
:func:`kcd_fast.crops.crop_draws` draws what the worker could not from the decoded shapes.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from kcd_fast.crops import crop_draws, eval_crops, random_resized_crop_boxes, train_crops
from kcd_fast.data import CorruptImageError

__all__ = ["FileBytesDataset", "collate_bytes", "EncodedBatch", "describe_file", "JpegHeader", "read_jpeg_header",
           "decodes_on_device", "on_stream", "hand_over", "on_decode_stream", "decode_batch", "train_batch",
           "eval_batch"]

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
    """``work(*args)`` queued on the CUDA ``stream``, then :func:`hand_over` to the current stream.
    ``stream`` None: just the call."""
    if stream is None:
        return work(*args)
    with torch.cuda.stream(stream):
        out = work(*args)
        ready = torch.cuda.Event()
        ready.record(stream)
    return hand_over(out, ready, stream.device)


def hand_over(out, ready, device):
    """``out`` (a sequence), made on another stream up to the CUDA event ``ready``, for the current stream
    of ``device``: it waits for ``ready`` on the device (no host sync), and the CUDA tensors among
    ``out`` are marked as used there, so their memory is not reused while the current stream reads them."""
    current = torch.cuda.current_stream(device)
    current.wait_event(ready)
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
