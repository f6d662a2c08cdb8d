"""Tests for kcd_fast.data (CPU only, no network)."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kcd_fast.data import (
    DATASETS,
    DEFAULT_DATA_DIRS,
    DataBundle,
    DatasetNotFoundError,
    InMemoryImageDataset,
    build_datasets,
    eval_view,
    read_idx,
)

FMNIST_DIR = Path(DEFAULT_DATA_DIRS["fashion-mnist"])


# ----------------------------------------------------------------------------- general


def test_unknown_name_raises_value_error():
    with pytest.raises(ValueError) as ei:
        build_datasets("mnist-9000")
    msg = str(ei.value)
    assert "mnist-9000" in msg
    for name in DATASETS:
        assert name in msg


# ----------------------------------------------------------------------------- digits


def test_digits_sizes_shapes_classes():
    b = build_datasets("digits")
    assert isinstance(b, DataBundle)
    assert (b.name, b.num_classes, b.in_channels, b.image_size) == ("digits", 10, 1, 8)
    assert len(b.train) == 1437 and len(b.val) == 360
    x, y = b.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y < 10
    xv, yv = b.val[0]
    assert xv.shape == (1, 8, 8) and isinstance(yv, int)
    # Pixels 0..16 mapped to uint8 0..255.
    assert b.train.images.dtype == torch.uint8
    assert int(b.train.images.max()) == 255 and int(b.train.images.min()) == 0
    # Stratified: every class present in both splits, in near-equal proportion.
    tr_counts = torch.bincount(b.train.targets, minlength=10)
    va_counts = torch.bincount(b.val.targets, minlength=10)
    assert (va_counts >= 34).all() and (va_counts <= 38).all()
    assert int(tr_counts.sum()) == 1437


def test_digits_split_is_deterministic_and_ignores_global_rng():
    torch.manual_seed(1)
    np.random.seed(1)
    a = build_datasets("digits", seed=1)
    torch.manual_seed(99)
    np.random.seed(99)
    b = build_datasets("digits", seed=7)
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.train.targets, b.train.targets)
    assert torch.equal(a.val.images, b.val.images)
    # Splits are disjoint and together cover all 1797 images (up to duplicates in the data).
    assert len(a.train) + len(a.val) == 1797


def test_digits_eval_transform_and_eval_view():
    b = build_datasets("digits")
    # Eval transform: deterministic, normalized train split has mean ~0, std ~1.
    ev = eval_view(b)
    assert len(ev) == len(b.train)
    assert ev.images is b.train.images
    x1, y1 = ev[5]
    x2, y2 = ev[5]
    assert torch.equal(x1, x2) and y1 == y2 == int(b.train.targets[5])
    xs = torch.stack([ev[i][0] for i in range(len(ev))])
    assert abs(xs.mean().item()) < 0.05 and abs(xs.std().item() - 1) < 0.05
    # train_transform=False gives the same as the eval view.
    nb = build_datasets("digits", train_transform=False)
    assert torch.equal(nb.train[5][0], x1)
    # Augmented train items: same shape, crops differ across calls for some item.
    torch.manual_seed(0)
    assert any(not torch.equal(b.train[i][0], b.train[i][0]) for i in range(20))


# ----------------------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_loads_from_default_folder():
    if not FMNIST_DIR.is_dir():
        pytest.skip(
            f"{FMNIST_DIR} absent: install the Debian package dataset-fashion-mnist to run this"
        )
    b = build_datasets("fashion-mnist")
    assert (b.name, b.num_classes, b.in_channels, b.image_size) == ("fashion-mnist", 10, 1, 28)
    assert len(b.train) == 60000 and len(b.val) == 10000
    assert b.train.images.shape == (60000, 28, 28) and b.train.images.dtype == torch.uint8
    assert int(b.train.targets.min()) == 0 and int(b.train.targets.max()) == 9
    assert int(b.val.targets.min()) == 0 and int(b.val.targets.max()) == 9
    assert (torch.bincount(b.train.targets) == 6000).all()
    x, y = b.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y < 10
    xv, _ = b.val[0]
    assert xv.shape == (1, 28, 28)


def test_fashion_mnist_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetNotFoundError) as ei:
        build_datasets("fashion-mnist", missing)
    msg = str(ei.value)
    assert str(missing) in msg
    assert "dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert isinstance(ei.value, FileNotFoundError)


def _write_idx(path: Path, arr: np.ndarray, gz: bool):
    import gzip
    import struct

    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        data = gzip.compress(data)
    path.write_bytes(data)


def test_fashion_mnist_small_idx_files_plain_and_gz(tmp_path):
    rng = np.random.default_rng(0)
    names = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(12) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(5),
    }
    for k, (name, arr) in enumerate(names.items()):
        gz = k % 2 == 0  # mix plain and gzipped files
        _write_idx(tmp_path / (name + (".gz" if gz else "")), arr, gz)
    b = build_datasets("fashion-mnist", tmp_path)
    assert len(b.train) == 12 and len(b.val) == 5
    assert torch.equal(b.train.images, torch.from_numpy(names["train-images-idx3-ubyte"]).byte())
    assert b.val.targets.tolist() == [0, 1, 2, 3, 4]

    # One file missing: error names the folder and the file.
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError) as ei:
        build_datasets("fashion-mnist", tmp_path)
    assert str(tmp_path) in str(ei.value) and "t10k-labels-idx1-ubyte" in str(ei.value)

    # A bad file: ValueError naming it.
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(b"\x12\x34\x56\x78garbage")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte"):
        build_datasets("fashion-mnist", tmp_path)
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(bad)


# ----------------------------------------------------------------------------- cifar100


def test_cifar100_missing_without_download(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_download(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", no_download)
    with pytest.raises(DatasetNotFoundError) as ei:
        build_datasets("cifar100", tmp_path)
    msg = str(ei.value)
    assert str(tmp_path) in msg and "--download" in msg
    assert list(tmp_path.iterdir()) == []

    # A cifar-100-python/ folder without the data files is reported the same way.
    (tmp_path / "cifar-100-python").mkdir()
    with pytest.raises(DatasetNotFoundError, match="--download"):
        build_datasets("cifar100", tmp_path)


def _cifar100_folder(root, content: bytes):
    """root/cifar-100-python/ holding train, test and meta files of ``content`` (not the archive's)."""
    folder = root / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(content)
    return folder


def test_cifar100_data_dir_pointing_at_the_inner_folder_says_use_its_parent(tmp_path):
    inner = _cifar100_folder(tmp_path, b"")
    with pytest.raises(DatasetNotFoundError, match="point --data-dir at the folder that holds it") as ei:
        build_datasets("cifar100", inner)
    assert f"({tmp_path})" in str(ei.value)


def test_cifar100_from_torchvision_layout(tmp_path, monkeypatch):
    """A tiny file set in the torchvision layout (checksums patched out) loads as uint8 HWC."""
    import pickle

    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tv_cifar.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar.CIFAR100, "download", lambda self: pytest.fail("downloaded"))
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("test", 4)):
        entry = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                 "fine_labels": list(range(n))}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [str(i) for i in range(100)]}))
    b = build_datasets("cifar100", tmp_path)
    assert (b.name, b.num_classes, b.in_channels, b.image_size) == ("cifar100", 100, 3, 32)
    assert len(b.train) == 6 and len(b.val) == 4
    assert isinstance(b.train, InMemoryImageDataset)
    assert b.train.images.shape == (6, 32, 32, 3) and b.train.images.dtype == torch.uint8
    x, y = b.train[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 2
    # Eval transform is ToTensor + Normalize with the CIFAR-100 statistics.
    mean = torch.tensor([0.5071, 0.4867, 0.4408]).view(3, 1, 1)
    std = torch.tensor([0.2675, 0.2565, 0.2761]).view(3, 1, 1)
    expect = (b.val.images[1].permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(b.val[1][0], expect, atol=1e-5)
    assert torch.allclose(eval_view(b)[0][0],
                          (b.train.images[0].permute(2, 0, 1).float() / 255 - mean) / std,
                          atol=1e-5)


# ----------------------------------------------------------------------------- imagenet


def _make_image_folder(root: Path, classes=("cat", "dog"), n=3, splits=("train", "val")):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
                ext = "JPEG" if i % 2 == 0 else "png"
                Image.fromarray(arr).save(d / f"img{i}.{ext}")


def test_imagenet_tiny_image_folder(tmp_path):
    _make_image_folder(tmp_path)
    b = build_datasets("imagenet", tmp_path)
    assert (b.name, b.num_classes, b.in_channels, b.image_size) == ("imagenet", 2, 3, 224)
    assert len(b.train) == 6 and len(b.val) == 6
    for ds in (b.train, b.val, eval_view(b)):
        x, y = ds[0]
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        assert isinstance(y, int) and y in (0, 1)
    assert sorted(b.val[i][1] for i in range(6)) == [0, 0, 0, 1, 1, 1]
    ev = eval_view(b)
    assert torch.equal(ev[4][0], ev[4][0])  # eval transform is deterministic


@pytest.mark.parametrize("missing", ["train", "val", "root"])
def test_imagenet_missing_folder_named(tmp_path, missing):
    _make_image_folder(tmp_path, splits=[s for s in ("train", "val") if s != missing])
    root = tmp_path / "absent" if missing == "root" else tmp_path
    expected = root if missing == "root" else tmp_path / missing
    with pytest.raises(DatasetNotFoundError) as ei:
        build_datasets("imagenet", root)
    msg = str(ei.value)
    assert str(expected) in msg
    assert "train/<class>" in msg and "val/<class>" in msg


def test_imagenet_class_mismatch(tmp_path):
    _make_image_folder(tmp_path, classes=("a", "b", "c"), splits=["train"])
    _make_image_folder(tmp_path, classes=("a", "b"), splits=["val"])
    with pytest.raises(ValueError, match=r"3 classes.*2"):
        build_datasets("imagenet", tmp_path)


# ----------------------------------------------------------------------------- fake


def test_fake_determinism_labels_and_splits():
    b = build_datasets("fake", fake_size=64, fake_val_size=32, fake_image_size=16,
                       fake_num_classes=5, seed=3)
    assert (b.name, b.num_classes, b.in_channels, b.image_size) == ("fake", 5, 3, 16)
    assert len(b.train) == 64 and len(b.val) == 32
    x1, y1 = b.train[7]
    torch.manual_seed(123)  # the global RNG must not matter
    x2, y2 = b.train[7]
    assert x1.shape == (3, 16, 16) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and y1 == y2
    # A rebuilt bundle gives the same data.
    b2 = build_datasets("fake", fake_size=64, fake_val_size=32, fake_image_size=16,
                        fake_num_classes=5, seed=3)
    assert torch.equal(b2.train[7][0], x1)
    # Labels in range, all classes used.
    labels = [b.train[i][1] for i in range(len(b.train))]
    assert set(labels) == set(range(5))
    # Train and val differ (same label map, different samples).
    assert b.val[7][1] == y1
    assert not torch.equal(b.val[7][0], x1)
    # Different items differ.
    assert not torch.equal(b.train[8][0], x1)
    # Reading items leaves the global RNG untouched.
    state = torch.get_rng_state()
    b.train[0]
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(IndexError):
        b.train[64]


def test_fake_seeds_differ():
    a = build_datasets("fake", fake_size=16, fake_image_size=8, seed=0)
    b = build_datasets("fake", fake_size=16, fake_image_size=8, seed=1)
    assert any(not torch.equal(a.train[i][0], b.train[i][0]) for i in range(4))


def test_fake_is_learnable():
    """Nearest class-mean classifier fit on train beats chance by far on val."""
    b = build_datasets("fake", fake_size=200, fake_val_size=100, fake_image_size=8,
                       fake_num_classes=10, seed=0)
    xt = torch.stack([b.train[i][0] for i in range(200)]).flatten(1)
    yt = torch.tensor([b.train[i][1] for i in range(200)])
    xv = torch.stack([b.val[i][0] for i in range(100)]).flatten(1)
    yv = torch.tensor([b.val[i][1] for i in range(100)])
    means = torch.stack([xt[yt == c].mean(0) for c in range(10)])
    pred = torch.cdist(xv, means).argmin(1)
    assert (pred == yv).float().mean().item() > 0.5


def test_fake_imagenet_sized_is_cheap():
    t0 = time.perf_counter()
    b = build_datasets("fake", fake_size=1_281_167, fake_val_size=50_000,
                       fake_image_size=224, fake_num_classes=1000)
    assert time.perf_counter() - t0 < 1.0
    assert len(b.train) == 1_281_167 and len(b.val) == 50_000
    x, y = b.train[1_281_166]
    assert x.shape == (3, 224, 224) and 0 <= y < 1000
    assert eval_view(b) is b.train


# ----------------------------------------------------------------------------- InMemoryImageDataset


def test_in_memory_reads_images_at_call_time():
    images = torch.zeros(4, 5, 6, dtype=torch.uint8)
    ds = InMemoryImageDataset(images, torch.tensor([0, 1, 2, 3]))
    x, y = ds[2]
    assert x.shape == (1, 5, 6) and int(x.max()) == 0 and y == 2
    ds.images[2].fill_(200)  # in-place change by "other code"
    assert int(ds[2][0].min()) == 200
    images[2, 0, 0] = 7  # the caller's tensor is the same storage
    assert int(ds[2][0][0, 0, 0]) == 7


def test_in_memory_channels_last_and_transform():
    images = torch.arange(2 * 3 * 4 * 3).reshape(2, 3, 4, 3).to(torch.uint8)
    ds = InMemoryImageDataset(images, [1, 0], transform=lambda t: t.float() / 255)
    x, y = ds[1]
    assert x.shape == (3, 3, 4) and x.dtype == torch.float32 and y == 0
    assert torch.allclose(x, images[1].permute(2, 0, 1).float() / 255)
    with pytest.raises(TypeError):
        InMemoryImageDataset(images.float(), [1, 0])
    with pytest.raises(ValueError):
        InMemoryImageDataset(images, [1, 0, 1])


def test_eval_view_sees_in_place_changes():
    b = build_datasets("digits")
    ev = eval_view(b)
    before = ev[0][0].clone()
    b.train.images[0].fill_(255)
    after = ev[0][0]
    assert not torch.equal(before, after)
    assert torch.allclose(after, after.flatten()[0].expand_as(after))


def test_an_image_that_does_not_decode_is_named(tmp_path):
    """A truncated or non-image file raises CorruptImageError naming the file (an OSError)."""
    from PIL import Image

    from kcd_fast.data import CorruptImageError, _load_rgb_tensor

    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(good)
    assert _load_rgb_tensor(str(good)).shape == (3, 16, 16)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:200])
    text = tmp_path / "notes.jpg"
    text.write_bytes(b"not an image at all")
    for bad in (cut, text):
        with pytest.raises(CorruptImageError, match=f"cannot decode the image {bad}") as ei:
            _load_rgb_tensor(str(bad))
        assert isinstance(ei.value, OSError)


def test_random_crop_reaches_every_offset():
    from torchvision.transforms.v2 import RandomCrop
    torch.manual_seed(0)
    x = torch.arange(1, 17, dtype=torch.uint8).view(1, 4, 4)
    crop = RandomCrop(4, padding=1)
    corners = {int(crop(x)[0, 0, 0]) for _ in range(400)}
    assert corners == {0, 1, 2, 5, 6}  # padded zero, or the pixel at offsets (0..1, 0..1)
    last_rows = {int(crop(x)[0, 3, 3]) for _ in range(400)}
    assert 0 in last_rows and 16 in last_rows


def test_horizontal_flip_flips_left_right():
    from torchvision.transforms.v2 import RandomHorizontalFlip
    x = torch.arange(6).view(1, 2, 3)
    assert torch.equal(RandomHorizontalFlip(p=1.0)(x), x.flip(-1))


def test_read_idx_refuses_trailing_bytes(tmp_path):
    from kcd_fast.data import read_idx
    p = tmp_path / "a-idx1-ubyte"
    p.write_bytes(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([1, 2, 3]) + b"junk")
    with pytest.raises(ValueError, match="holds"):
        read_idx(p)


def test_fake_negative_index():
    from kcd_fast.data import FakeImageDataset
    ds = FakeImageDataset(5, image_size=4)
    assert torch.equal(ds[-1][0], ds[4][0]) and ds[-1][1] == ds[4][1]
    with pytest.raises(IndexError):
        ds[-6]


def test_cifar100_files_that_fail_the_md5_check_are_not_called_missing(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", lambda self: pytest.fail("downloaded"))
    folder = _cifar100_folder(tmp_path, b"not the archive's")
    with pytest.raises(DatasetNotFoundError, match="fails torchvision's md5 check of its train/test files") as ei:
        build_datasets("cifar100", tmp_path)
    assert "replace them with those of the original archive" in str(ei.value)
    assert (folder / "train").read_bytes() == b"not the archive's"


def test_cifar100_download_without_network_names_the_url(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", offline)
    with pytest.raises(DatasetNotFoundError, match="could not download CIFAR-100 from https://") as ei:
        build_datasets("cifar100", tmp_path, download=True)
    assert "extract that archive there by hand" in str(ei.value)
