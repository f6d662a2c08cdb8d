"""Datasets for kcd_fast: digits, Fashion-MNIST, CIFAR-100, ImageNet and a generated fake set.

Everything goes through :func:`build_datasets`, which returns a :class:`DataBundle` of a train and
a val split. Each split is a map-style dataset whose ``__getitem__(i)`` returns
``(x, y)`` with ``x`` a float tensor ``[C, H, W]`` and ``y`` an ``int``.

Nothing here downloads data unless asked to (``download=True`` for CIFAR-100 only).
Transforms (torchvision.transforms.v2) work on tensors, not PIL images.
"""

from __future__ import annotations

import copy
import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_DIRS",
    "DatasetNotFoundError",
    "CorruptImageError",
    "DataBundle",
    "InMemoryImageDataset",
    "FakeImageDataset",
    "build_datasets",
    "eval_view",
    "mix_seed",
    "read_idx",
]

DATASETS = ("digits", "fashion-mnist", "cifar100", "imagenet", "fake")

# digits and fake need no folder. Relative paths are resolved against the working directory.
DEFAULT_DATA_DIRS = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "cifar100": ".data/cifar100",
    "imagenet": ".data/imagenet",
}

PathLike = Union[str, "os.PathLike[str]"]

# Fixed seed of the digits train/val split, so the split never depends on `seed` or global RNG.
DIGITS_SPLIT_SEED = 0
DIGITS_VAL_SIZE = 360

# Fashion-MNIST train-split pixel mean/std in [0, 1] (computed once from the 60,000 train images).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class CorruptImageError(OSError):
    """An image file of a dataset that does not decode; the message names the file."""

    def __str__(self) -> str:
        return self.args[0]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message names the path and how to get the data."""

    def __init__(self, message: str, path: Optional[PathLike] = None):
        super().__init__(message)
        self.path = None if path is None else str(path)

    def __str__(self) -> str:  # FileNotFoundError would otherwise format errno-style args
        return self.args[0]


@dataclass
class DataBundle:
    """Train and val splits of one dataset, plus what a model needs to know about it."""

    train: Dataset
    val: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    name: str


# --------------------------------------------------------------------------------------
# Transforms: torchvision.transforms.v2 on uint8 [C, H, W] tensors, float32 out. The random ones
# draw from torch's global RNG, which the trainer seeds per (seed, epoch, rank) and DataLoader per
# worker.
# --------------------------------------------------------------------------------------


def _to_normalized_float(mean, std) -> list:
    """uint8 -> float32 in [0, 1] -> (x - mean) / std."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def _small_image_transforms(size: int, padding: int, mean, std, flip: bool = False):
    """(train, eval) transforms for small in-memory images: zero-padded random crop [+ flip], then normalize."""
    train = [v2.RandomCrop(size, padding=padding)] + ([v2.RandomHorizontalFlip()] if flip else [])
    return v2.Compose(train + _to_normalized_float(mean, std)), v2.Compose(_to_normalized_float(mean, std))


def _imagenet_transforms():
    """(train, eval) transforms of the usual ImageNet recipe."""
    norm = _to_normalized_float(IMAGENET_MEAN, IMAGENET_STD)
    train = v2.Compose([v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip(), *norm])
    val = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224), *norm])
    return train, val


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


class InMemoryImageDataset(Dataset):
    """Images held in memory as a uint8 tensor ``images`` [N, H, W] or [N, H, W, C]
    (channels last), with int64 ``targets`` [N].

    ``images`` is public and may be changed in place by other code; ``__getitem__`` reads it at
    call time. An item is ``(transform(img), int(target))`` where ``img`` is a uint8 [C, H, W]
    view of ``images[i]`` (returned as is when ``transform`` is None).
    """

    def __init__(self, images: torch.Tensor, targets, transform: Optional[Callable] = None):
        if not isinstance(images, torch.Tensor):
            images = torch.as_tensor(np.asarray(images))
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be a uint8 tensor, got {images.dtype}")
        if images.dim() not in (3, 4):
            raise ValueError(
                f"images must be [N, H, W] or [N, H, W, C], got shape {tuple(images.shape)}"
            )
        targets = torch.as_tensor(targets, dtype=torch.int64)
        if targets.dim() != 1 or len(targets) != len(images):
            raise ValueError(
                f"targets must be [N] with N={len(images)}, got shape {tuple(targets.shape)}"
            )
        self.images = images
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        img = img.unsqueeze(0) if img.dim() == 2 else img.permute(2, 0, 1)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])

    def __repr__(self) -> str:
        return (
            f"InMemoryImageDataset(n={len(self)}, image_shape={tuple(self.images.shape[1:])}, "
            f"transform={self.transform!r})"
        )


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of the splitmix64 mixer (a bijection on 64-bit integers)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """Hash integers into one 63-bit seed for a torch.Generator (splitmix64 over each in turn)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


class FakeImageDataset(Dataset):
    """Generated, learnable images: a smooth class pattern times a random gain, plus noise.

    Item ``i`` is computed on the fly from ``(seed, split, i)`` with its own torch.Generator,
    so it is deterministic, needs no memory up front, and never touches the global RNG.
    Every split with the same ``seed`` and ``num_classes`` shares the class patterns and label
    map; different ``split`` values give different samples. Label of item ``i`` is
    ``perm[i % num_classes]`` with ``perm`` a permutation drawn from ``seed``.
    """

    GRID = 4  # class patterns are random GRID x GRID x 3 grids, bilinearly upsampled
    NOISE_STD = 1.0

    def __init__(
        self,
        size: int,
        image_size: int = 32,
        num_classes: int = 10,
        seed: int = 0,
        split: int = 0,
        channels: int = 3,
    ):
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.size = int(size)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.split = int(split)
        self.channels = int(channels)
        g = torch.Generator().manual_seed(mix_seed(self.seed, 0x1ABE1))
        self._label_perm = torch.randperm(self.num_classes, generator=g)

    def __len__(self) -> int:
        return self.size

    def label(self, i: int) -> int:
        """Label of item ``i`` (no image generated)."""
        return int(self._label_perm[self._check_index(i) % self.num_classes])

    def class_pattern(self, c: int) -> torch.Tensor:
        """The noiseless float [C, H, W] pattern of class ``c``."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, 0xC1A55, c))
        grid = min(self.GRID, self.image_size)
        low = torch.randn(1, self.channels, grid, grid, generator=g)
        size = (self.image_size, self.image_size)
        return F.interpolate(low, size=size, mode="bilinear", align_corners=False)[0]

    def _check_index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for FakeImageDataset of size {self.size}")
        return i

    def __getitem__(self, i):
        i = self._check_index(i)
        y = int(self._label_perm[i % self.num_classes])
        g = torch.Generator().manual_seed(mix_seed(self.seed, 0x5A3E, self.split, i))
        gain = 0.5 + torch.rand((), generator=g)
        noise = torch.randn(self.channels, self.image_size, self.image_size, generator=g)
        x = self.class_pattern(y).mul_(gain).add_(noise, alpha=self.NOISE_STD)
        return x, y

    def materialize(self, device, dtype=torch.float32, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """All items as (x [N, C, H, W], y [N]) on ``device``, generated there in chunks.

        The same class patterns, gains and label map as ``__getitem__``, but the noise comes
        from one device generator seeded by (seed, split) instead of one per index: fast enough
        for ImageNet-sized throughput runs, and deterministic, though not item-for-item equal.
        """
        device = torch.device(device)
        patterns = torch.stack([self.class_pattern(c) for c in range(self.num_classes)]).to(device)
        labels = self._label_perm[torch.arange(self.size) % self.num_classes].to(device)
        g = torch.Generator(device=device).manual_seed(mix_seed(self.seed, 0xDE71CE, self.split))
        x = torch.empty(self.size, self.channels, self.image_size, self.image_size, dtype=dtype, device=device)
        for s in range(0, self.size, chunk):
            y = labels[s:s + chunk]
            gain = 0.5 + torch.rand(len(y), 1, 1, 1, generator=g, device=device)
            noise = torch.randn(len(y), self.channels, self.image_size, self.image_size, generator=g, device=device)
            x[s:s + chunk] = (patterns[y] * gain + noise * self.NOISE_STD).to(dtype)
        return x, labels

    def __repr__(self) -> str:
        return (
            f"FakeImageDataset(size={self.size}, image_size={self.image_size}, "
            f"num_classes={self.num_classes}, seed={self.seed}, split={self.split})"
        )


# --------------------------------------------------------------------------------------
# IDX files (MNIST / Fashion-MNIST format)
# --------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or plain) into a numpy array; a bad file raises ValueError."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({expected} bytes of data) "
            f"but the file holds {len(raw) - header} bytes"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def _find_idx(folder: Path, base: str) -> Optional[Path]:
    for name in (base, base + ".gz"):
        p = folder / name
        if p.is_file():
            return p
    return None


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------


def _build_digits(train_transform: bool) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    labels = d.target.astype(np.int64)
    idx_train, idx_val = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_VAL_SIZE,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,  # own RandomState: independent of the global RNG
    )
    x_train = torch.from_numpy(images[idx_train])
    x_val = torch.from_numpy(images[idx_val])
    # Mean/std of the train split (cheap: 1437 8x8 images).
    pix = x_train.to(torch.float64) / 255.0
    mean, std = (pix.mean().item(),), (pix.std().item(),)
    tr, ev = _small_image_transforms(8, 1, mean, std)
    return DataBundle(
        train=InMemoryImageDataset(x_train, labels[idx_train], tr if train_transform else ev),
        val=InMemoryImageDataset(x_val, labels[idx_val], ev),
        num_classes=10,
        in_channels=1,
        image_size=8,
        name="digits",
    )


def _build_fashion_mnist(data_dir: Path, train_transform: bool) -> DataBundle:
    how = (
        "Install the Debian package `dataset-fashion-mnist` (apt-get install "
        "dataset-fashion-mnist), which puts the files in "
        f"{DEFAULT_DATA_DIRS['fashion-mnist']}, or point --data-dir at a folder holding the "
        "four IDX files: " + ", ".join(f"{b}[.gz]" for b in FASHION_MNIST_FILES.values()) + "."
    )
    if not data_dir.is_dir():
        raise DatasetNotFoundError(f"Fashion-MNIST folder not found: {data_dir}. {how}", data_dir)
    paths = {k: _find_idx(data_dir, b) for k, b in FASHION_MNIST_FILES.items()}
    missing = [FASHION_MNIST_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST files missing in {data_dir}: {', '.join(missing)} "
            f"(plain or .gz). {how}",
            data_dir,
        )

    def load(img_key: str, lbl_key: str):
        images, labels = read_idx(paths[img_key]), read_idx(paths[lbl_key])
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise ValueError(
                f"{paths[img_key]}: expected uint8 images [N, 28, 28], "
                f"got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"{paths[lbl_key]}: expected {len(images)} labels, got shape {labels.shape}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"{paths[lbl_key]}: labels outside 0..9")
        return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))

    x_train, y_train = load("train_images", "train_labels")
    x_val, y_val = load("test_images", "test_labels")
    tr, ev = _small_image_transforms(28, 2, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    return DataBundle(
        train=InMemoryImageDataset(x_train, y_train, tr if train_transform else ev),
        val=InMemoryImageDataset(x_val, y_val, ev),
        num_classes=10,
        in_channels=1,
        image_size=28,
        name="fashion-mnist",
    )


def _build_cifar100(data_dir: Path, download: bool, train_transform: bool) -> DataBundle:
    from torchvision.datasets import CIFAR100

    how = (
        "Pass --download to fetch it, or put the torchvision CIFAR-100 layout there "
        f"({data_dir / 'cifar-100-python'}/ holding train, test and meta)."
    )
    if data_dir.name == "cifar-100-python" and all((data_dir / f).is_file() for f in ("train", "test", "meta")):
        raise DatasetNotFoundError(
            f"{data_dir} is the cifar-100-python/ folder itself; point --data-dir at the folder that holds it "
            f"({data_dir.parent})", data_dir
        )
    if not download and not (data_dir / "cifar-100-python").is_dir():
        raise DatasetNotFoundError(
            f"CIFAR-100 not found in {data_dir} (no cifar-100-python/ folder). {how}", data_dir
        )
    had_files = all((data_dir / "cifar-100-python" / f).is_file() for f in ("train", "test"))
    try:
        tv_train = CIFAR100(root=str(data_dir), train=True, download=download)
        tv_val = CIFAR100(root=str(data_dir), train=False, download=download)
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        if had_files:  # the files are there but fail torchvision's md5 check: --download would not help
            raise DatasetNotFoundError(
                f"CIFAR-100 in {data_dir / 'cifar-100-python'} fails torchvision's md5 check of its train/test "
                f"files (a partial or modified copy); replace them with those of the original archive "
                f"({CIFAR100.url}), or delete the folder and pass --download", data_dir
            ) from e
        raise DatasetNotFoundError(f"CIFAR-100 in {data_dir} is missing or corrupted ({e}). {how}", data_dir) from e
    except OSError as e:  # --download without network, or an unwritable folder
        raise DatasetNotFoundError(
            f"could not download CIFAR-100 from {CIFAR100.url} into {data_dir} ({type(e).__name__}: {e}); "
            f"download and extract that archive there by hand (it holds cifar-100-python/)", data_dir
        ) from e
    tr, ev = _small_image_transforms(32, 4, CIFAR100_MEAN, CIFAR100_STD, flip=True)
    train = InMemoryImageDataset(
        torch.from_numpy(np.ascontiguousarray(tv_train.data)),
        tv_train.targets,
        tr if train_transform else ev,
    )
    val = InMemoryImageDataset(
        torch.from_numpy(np.ascontiguousarray(tv_val.data)), tv_val.targets, ev
    )
    return DataBundle(train, val, num_classes=100, in_channels=3, image_size=32, name="cifar100")


def _load_rgb_tensor(path: str) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor [3, H, W]. A file that does not decode raises
    :class:`CorruptImageError` naming it (one bad file among 1.28 million must be findable)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"))  # a writable copy
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: truncated (OSError), unidentified, bad headers
        raise CorruptImageError(f"cannot decode the image {path}: {exc}") from None
    return torch.from_numpy(arr).permute(2, 0, 1)


def _build_imagenet(data_dir: Path, train_transform: bool) -> DataBundle:
    from torchvision.datasets import ImageFolder

    layout = (
        f"Expected layout: {data_dir}/train/<class>/*.JPEG and {data_dir}/val/<class>/*.JPEG, "
        "with the same class folders in both (val/ sorted into class folders, e.g. with the "
        "usual valprep.sh script). Point --data-dir at the folder holding train/ and val/."
    )
    for p in (data_dir, data_dir / "train", data_dir / "val"):
        if not p.is_dir():
            raise DatasetNotFoundError(f"ImageNet folder not found: {p}. {layout}", p)
    tr, ev = _imagenet_transforms()
    splits = {}
    for split, tf in (("train", tr if train_transform else ev), ("val", ev)):
        try:
            splits[split] = ImageFolder(str(data_dir / split), transform=tf, loader=_load_rgb_tensor)
        except FileNotFoundError as e:  # no class folders, or a class folder without images
            raise DatasetNotFoundError(
                f"ImageNet {split} split in {data_dir / split} is incomplete ({e}). {layout}",
                data_dir / split,
            ) from e
    train, val = splits["train"], splits["val"]
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise ValueError(
            f"ImageNet class folders differ: {data_dir / 'train'} has {len(train.classes)} "
            f"classes, {data_dir / 'val'} has {len(val.classes)} "
            f"(e.g. only in train: {only_train}, only in val: {only_val})"
        )
    return DataBundle(
        train, val, num_classes=len(train.classes), in_channels=3, image_size=224, name="imagenet"
    )


def build_datasets(
    name: str,
    data_dir: Optional[PathLike] = None,
    *,
    download: bool = False,
    train_transform: bool = True,
    fake_size: int = 1024,
    fake_val_size: int = 256,
    fake_image_size: int = 32,
    fake_num_classes: int = 10,
    seed: int = 0,
) -> DataBundle:
    """Build the train and val splits of dataset ``name`` (one of :data:`DATASETS`).

    ``data_dir`` defaults to ``DEFAULT_DATA_DIRS[name]`` (unused by digits and fake).
    ``download`` only applies to cifar100. ``train_transform=False`` gives the train split the
    evaluation transform (no augmentation). The ``fake_*`` arguments and ``seed`` only apply to
    the fake dataset. Missing data raises :class:`DatasetNotFoundError`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    folder = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIRS.get(name, "."))
    folder = folder.expanduser()

    if name == "digits":
        return _build_digits(train_transform)
    if name == "fashion-mnist":
        return _build_fashion_mnist(folder, train_transform)
    if name == "cifar100":
        return _build_cifar100(folder, download, train_transform)
    if name == "imagenet":
        return _build_imagenet(folder, train_transform)
    # fake
    kw = dict(image_size=fake_image_size, num_classes=fake_num_classes, seed=seed)
    return DataBundle(
        train=FakeImageDataset(fake_size, split=0, **kw),
        val=FakeImageDataset(fake_val_size, split=1, **kw),
        num_classes=int(fake_num_classes),
        in_channels=3,
        image_size=int(fake_image_size),
        name="fake",
    )


def eval_view(bundle: DataBundle) -> Dataset:
    """The train split with the evaluation transform: same items, same order as bundle.train.

    The view shares the train split's storage (e.g. ``InMemoryImageDataset.images``), so
    in-place changes to it show in the view. Datasets without a transform (fake) come back as is.
    """
    train = bundle.train
    if not hasattr(train, "transform"):
        return train
    view = copy.copy(train)
    view.transform = getattr(bundle.val, "transform", None)
    return view
