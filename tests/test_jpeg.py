"""kcd_fast.jpeg: bytes out of the dataset, batched decode with a counted PIL fallback, reproducible
crop draws equal to torchvision's, and batched transforms equal to the v2 pipeline of kcd_fast.data."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from helpers import TRITON_DEVICE
from kcd_fast import crops, jpeg
from kcd_fast.data import IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, build_datasets

# libjpeg-turbo decodes with the same integer IDCT and upsampling in PIL and torchvision; builds
# linked to other libjpeg versions may round a few pixel values differently, by 1 or 2.
MAX_DIFF = 2
# CMYK -> RGB is done by each library's own integer formula (k * c / 255 in torchvision): one more unit.
MAX_DIFF_CMYK = 3


def textured(h, w, seed=0):
    """A smooth pattern plus mild noise: compresses like a photograph, and crops differ visibly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 7.0 + c) * 60 + np.cos(yy / 5.0 - c) * 60 + 128 for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def encode(im, fmt="JPEG", **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def files(tmp_path):
    """ImageFolder tree root/{train,val}/<class>/*.JPEG: RGB of odd sizes, CMYK, grayscale, progressive,
    PNG bytes named .JPEG; a truncated file lives apart in bad/."""
    arrays = {"rgb_a": textured(37, 53, 1), "rgb_b": textured(301, 227, 2), "rgb_c": textured(120, 411, 3)}
    content = {name: encode(Image.fromarray(a), quality=90) for name, a in arrays.items()}
    content["cmyk"] = encode(Image.fromarray(textured(64, 81, 4)).convert("CMYK"), quality=90)
    content["gray"] = encode(Image.fromarray(textured(77, 59, 5)).convert("L"), quality=90)
    content["progressive"] = encode(Image.fromarray(textured(90, 70, 6)), quality=90, progressive=True)
    content["png"] = encode(Image.fromarray(textured(45, 66, 7)), "PNG")
    for split in ("train", "val"):
        for k, (name, data) in enumerate(sorted(content.items())):
            folder = tmp_path / split / f"class{k % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.JPEG").write_bytes(data)
    bad = tmp_path / "bad" / "class0"
    bad.mkdir(parents=True)
    (bad / "truncated.JPEG").write_bytes(content["rgb_b"][: len(content["rgb_b"]) // 3])
    return tmp_path


def pil_rgb(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def test_dataset_gives_bytes_and_collate_keeps_a_list(files):
    ds = jpeg.FileBytesDataset.from_folder(files / "train")
    assert len(ds) == 7
    data, label, i = ds[3]
    assert data.dtype == torch.uint8 and data.dim() == 1 and i == 3 and label == ds.samples[3][1]
    assert bytes(data.numpy()) == open(ds.path(3), "rb").read()
    # One worker: the byte tensors (which wrap a bytearray) must cross into shared memory.
    batch, labels, indices = next(iter(DataLoader(ds, batch_size=4, num_workers=1, collate_fn=jpeg.collate_bytes)))
    assert isinstance(batch, list) and len(batch) == 4 and all(b.dtype == torch.uint8 for b in batch)
    assert labels.tolist() == [y for _, y in ds.samples[:4]] and indices.tolist() == [0, 1, 2, 3]


def test_headers_give_size_and_components(files):
    ds = jpeg.FileBytesDataset.from_folder(files / "train")
    by_name = {p.rsplit("/", 1)[1]: ds[k][0] for k, (p, _) in enumerate(ds.samples)}
    assert jpeg.read_jpeg_header(by_name["rgb_b.JPEG"]) == jpeg.JpegHeader(301, 227, 3, False)
    assert jpeg.read_jpeg_header(by_name["cmyk.JPEG"]).components == 4
    assert jpeg.read_jpeg_header(by_name["gray.JPEG"]).components == 1
    assert jpeg.read_jpeg_header(by_name["progressive.JPEG"]).progressive
    assert jpeg.read_jpeg_header(by_name["png.JPEG"]) is None
    assert jpeg.read_jpeg_header(b"") is None and jpeg.read_jpeg_header(b"\xff\xd8\xff") is None
    # On CUDA, CMYK goes to the CPU fallback (nvjpeg has no CMYK conversion); on the CPU it does not.
    cmyk = jpeg.read_jpeg_header(by_name["cmyk.JPEG"])
    assert not jpeg.decodes_on_device(cmyk, "cuda") and jpeg.decodes_on_device(cmyk, "cpu")
    assert jpeg.decodes_on_device(jpeg.read_jpeg_header(by_name["gray.JPEG"]), "cuda")
    assert not jpeg.decodes_on_device(None, "cpu")


def test_an_encoded_batch_packs_the_files_and_their_headers(files):
    """Two tensors out of a worker: the bytes back as views, the headers as read_jpeg_header reads them,
    the worker's draws equal to drawing for the decoded sizes, also through a worker process."""
    ds = jpeg.FileBytesDataset.from_folder(files / "train")
    data = [ds[k][0] for k in range(len(ds))] + [torch.empty(0, dtype=torch.uint8)]
    indices = list(range(len(data)))
    batch = jpeg.EncodedBatch.pack(data, [jpeg.describe_file(d, 5, 2, i) for d, i in zip(data, indices)])
    assert batch.data.dtype == torch.uint8 and batch.table.shape == (len(data), len(jpeg.ENCODED_COLUMNS))
    assert [bytes(f.numpy()) for f in batch.files()] == [bytes(d.numpy()) for d in data]
    assert batch.headers() == [jpeg.read_jpeg_header(d) for d in data]
    packed = jpeg.EncodedBatch.pack(data[:-1], [jpeg.describe_file(d) for d in data[:-1]])
    from_batch, n_batch = jpeg.decode_batch(packed, "cpu", names=[p for p, _ in ds.samples])
    from_list, n_list = jpeg.decode_batch(data[:-1], "cpu")
    assert n_batch == n_list == 1 and all(torch.equal(a, b) for a, b in zip(from_batch, from_list))
    images, _ = jpeg.decode_batch(data[:-1], "cpu")
    boxes, flips = crops.crop_draws(images, 5, 2, indices[:-1], tuple(t[:-1] for t in batch.draws()))
    want = crops.random_resized_crop_boxes([i.shape[1] for i in images], [i.shape[2] for i in images], 5, 2, indices[:-1])
    assert torch.equal(boxes, want[0]) and torch.equal(flips, want[1])
    png = [k for k, (p, _) in enumerate(ds.samples) if p.endswith("png.JPEG")][0]
    assert batch.table[png].tolist()[1:] == [0] * 9  # no header, nothing drawn: the main process draws it
    assert jpeg.describe_file(data[0])[5:] == (0,) * 5  # no seed: no draw
    # Through a worker process: one EncodedBatch, equal to the one built here.
    loader = DataLoader([(d, jpeg.describe_file(d, 5, 2, i)) for i, d in enumerate(data)], batch_size=len(data),
                        num_workers=1, collate_fn=lambda items: jpeg.EncodedBatch.pack(*zip(*items)))
    crossed = next(iter(loader))
    assert torch.equal(crossed.data, batch.data) and torch.equal(crossed.table, batch.table)


def test_draws_for_another_size_are_drawn_again():
    """A row whose drawn-for size is not the decoded image's (or that has no draw) is drawn here, for the
    image's size: a wrong box never reaches the crop."""
    images = [torch.zeros(3, 40, 60, dtype=torch.uint8), torch.zeros(3, 50, 30, dtype=torch.uint8)]
    boxes = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    drawn = (boxes, torch.tensor([True, True]), torch.tensor([[40, 60], [30, 50]]))  # row 1 drawn for 30 x 50
    got_boxes, got_flips = crops.crop_draws(images, 0, 1, [7, 9], drawn)
    want = crops.random_resized_crop_boxes([50], [30], 0, 1, [9])
    assert got_boxes[0].tolist() == [1, 2, 3, 4] and bool(got_flips[0])
    assert torch.equal(got_boxes[1], want[0][0]) and bool(got_flips[1]) == bool(want[1][0])
    assert torch.equal(drawn[0], boxes)  # the worker's table is left as it was


def test_the_fused_kernel_through_train_and_eval_batches(files):
    """train_batch / eval_batch with the Triton kernel (on TRITON_DEVICE: the GPU, or CPU tensors under
    the interpreter) agree with their twin, v2 image by image on the same decoded images, within one
    uint8 level."""
    ds = jpeg.FileBytesDataset.from_folder(files / "train")
    data = [ds[k][0] for k in range(len(ds))]
    batch = jpeg.EncodedBatch.pack(data, [jpeg.describe_file(d, 3, 1, i) for i, d in enumerate(data)])
    level = 1.0 / 255.0 / min(IMAGENET_STD) * 1.001
    dev = TRITON_DEVICE
    fused, n_fused = jpeg.train_batch(batch, list(range(len(data))), 3, 1, dev, size=48, fused=True)
    twin, n_twin = jpeg.train_batch(data, list(range(len(data))), 3, 1, dev, size=48, fused=False)
    assert n_fused == n_twin and (n_fused == 1 or dev != "cpu")  # the PNG (on the GPU the CMYK file too)
    torch.testing.assert_close(fused, twin, rtol=0, atol=level)
    fused, _ = jpeg.eval_batch(batch, dev, resize=56, size=48, fused=True)
    torch.testing.assert_close(fused, jpeg.eval_batch(data, dev, resize=56, size=48, fused=False)[0], rtol=0,
                               atol=level)


def test_on_decode_stream_without_cuda_is_the_call_itself():
    images = [torch.zeros(3, 2, 2, dtype=torch.uint8), None]
    assert jpeg.on_decode_stream(lambda: images, torch.device("cpu")) is images


@pytest.mark.cuda
def test_gpu_decode_never_writes_memory_that_queued_kernels_still_read(files):
    """Blocks freed on the current stream while reductions that read them wait behind a long kernel:
    the decode must not be handed them (torchvision's decoder writes from a stream of its own), so the
    reductions see the values written before."""
    ds = jpeg.FileBytesDataset.from_folder(files / "train")
    data = [ds[k][0] for k in range(len(ds))]
    shapes = [img.shape for img in jpeg.decode_batch(data, "cuda")[0]]
    for trial in range(3):
        held = [torch.full(shape, k + 1, dtype=torch.uint8, device="cuda") for k, shape in enumerate(shapes)]
        torch.cuda.synchronize()
        torch.cuda._sleep(20_000_000)  # tens of ms of queued work on the current stream
        sums = [t.sum(dtype=torch.int64) for t in held]
        del held  # freed while the sums are still queued
        jpeg.decode_batch(data, "cuda")
        torch.cuda.synchronize()
        assert [int(v) for v in sums] == [(k + 1) * math.prod(shape) for k, shape in enumerate(shapes)], trial


def test_decode_equals_pil_and_counts_the_fallback(files):
    ds = jpeg.FileBytesDataset.from_folder(files / "train")
    data = [ds[k][0] for k in range(len(ds))]
    images, fallback = jpeg.decode_batch(data, "cpu", names=[p for p, _ in ds.samples])
    assert fallback == 1  # the PNG; grayscale and CMYK JPEGs decode_jpeg converts to RGB itself
    for (path, _), img, raw in zip(ds.samples, images, data):
        ref = pil_rgb(bytes(raw.numpy()))
        assert img.dtype == torch.uint8 and img.shape == ref.shape and img.shape[0] == 3, path
        diff = (img.int() - ref.int()).abs()
        assert diff.max() <= (MAX_DIFF_CMYK if "cmyk" in path else MAX_DIFF), path
        assert diff.float().mean() < 0.5, path


def test_a_file_nothing_decodes_raises_the_loaders_error_naming_it(files):
    bad = jpeg.FileBytesDataset.from_folder(files / "bad")
    good = jpeg.FileBytesDataset.from_folder(files / "train")
    data = [good[0][0], bad[0][0]]
    names = [good.path(0), bad.path(0)]
    with pytest.raises(CorruptImageError) as got:
        jpeg.decode_batch(data, "cpu", names=names)
    assert bad.path(0) in str(got.value) and str(got.value).startswith("cannot decode the image ")
    with pytest.raises(CorruptImageError, match="empty.JPEG"):
        jpeg.decode_batch([torch.empty(0, dtype=torch.uint8)], "cpu", names=["empty.JPEG"])
    # The same one-line error as the PIL loader of kcd_fast.data for that file.
    (files / "bad" / "val").mkdir()
    (files / "bad" / "train").mkdir()
    (files / "bad" / "class0").rename(files / "bad" / "train" / "class0")
    (files / "bad" / "val" / "class0").mkdir()
    (files / "bad" / "val" / "class0" / "ok.JPEG").write_bytes(bytes(good[0][0].numpy()))
    with pytest.raises(CorruptImageError) as today:
        build_datasets("imagenet", files / "bad").train[0]
    assert str(today.value) == str(got.value).replace(bad.path(0), str(files / "bad" / "train" / "class0" / "truncated.JPEG"))


def reference_box(height, width, g, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params in float64 Python, drawing its random numbers from
    ``g`` with the calls torchvision makes (float32 uniforms, randint)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        log_r = torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g).item()
        aspect = math.exp(log_r)
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return [top, left, h, w]
    if width / height < min(ratio):
        w, h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return [(height - h) // 2, (width - w) // 2, h, w]


SIZES = [(375, 500), (500, 333), (37, 53), (1, 1), (3, 400), (400, 5), (224, 224)]


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.9, 1.0)])
def test_boxes_follow_torchvisions_algorithm_and_stay_inside(scale):
    heights, widths = zip(*(SIZES * 30))
    indices = list(range(1000, 1000 + len(heights)))
    boxes, flips = crops.random_resized_crop_boxes(heights, widths, 7, 3, indices, scale=scale)
    assert boxes.dtype == torch.int64 and boxes.shape == (len(indices), 4) and flips.dtype == torch.bool
    for (h, w), idx, box, flip in zip(zip(heights, widths), indices, boxes.tolist(), flips.tolist()):
        g = crops.crop_generator(7, 3, idx)
        assert box == reference_box(h, w, g, scale), (h, w, idx)
        assert flip == bool(torch.rand(1, generator=g) < 0.5)
        top, left, bh, bw = box
        assert 0 <= top and 0 <= left and 0 < bh and 0 < bw and top + bh <= h and left + bw <= w
    assert 0.3 < flips.float().mean() < 0.7


def test_boxes_equal_the_v2_transforms_under_the_same_seed():
    """v2.RandomResizedCrop + RandomHorizontalFlip draw from the global RNG: seeded with crop_seed they
    give the same box and flip."""
    img = torch.zeros(3, 375, 500, dtype=torch.uint8)
    boxes, flips = crops.random_resized_crop_boxes([375] * 50, [500] * 50, 1, 2, range(50))
    rrc, flip = v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()
    with torch.random.fork_rng():
        for k in range(50):
            torch.manual_seed(crops.crop_seed(1, 2, k))
            p = rrc.make_params([img])
            assert [p["top"], p["left"], p["height"], p["width"]] == boxes[k].tolist()
            assert (torch.rand(1) < flip.p).item() == flips[k].item()


def test_boxes_are_reproducible_and_do_not_depend_on_the_batch():
    heights, widths, indices = [375, 500, 240, 333], [500, 375, 320, 500], [11, 4, 900, 37]
    boxes, flips = crops.random_resized_crop_boxes(heights, widths, 0, 5, indices)
    again = crops.random_resized_crop_boxes(heights, widths, 0, 5, indices)
    assert torch.equal(boxes, again[0]) and torch.equal(flips, again[1])
    order = [2, 0, 3, 1]
    shuffled = crops.random_resized_crop_boxes([heights[k] for k in order], [widths[k] for k in order], 0, 5,
                                              [indices[k] for k in order])
    assert torch.equal(shuffled[0], boxes[order]) and torch.equal(shuffled[1], flips[order])
    alone = crops.random_resized_crop_boxes(heights[2:3], widths[2:3], 0, 5, indices[2:3])
    assert torch.equal(alone[0][0], boxes[2])
    other_epoch = crops.random_resized_crop_boxes(heights, widths, 0, 6, indices)[0]
    assert not torch.equal(other_epoch, boxes)


def test_batched_transforms_equal_the_v2_functions():
    images = [torch.from_numpy(textured(h, w, h)).permute(2, 0, 1).contiguous() for h, w in SIZES[:4]]
    boxes, _ = crops.random_resized_crop_boxes([i.shape[1] for i in images], [i.shape[2] for i in images], 0, 0,
                                              range(4))
    flips = torch.tensor([True, False, False, True])
    got = crops.flip_(crops.resized_crops(images, boxes), flips)
    x = crops.normalize_to(got, IMAGENET_MEAN, IMAGENET_STD)
    norm = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for k, (img, (top, left, h, w)) in enumerate(zip(images, boxes.tolist())):
        ref = F.resized_crop(img, top, left, h, w, [224, 224], antialias=True)
        ref = F.horizontal_flip(ref) if flips[k] else ref
        assert torch.equal(got[k], ref)
        torch.testing.assert_close(x[k], norm(ref), rtol=0, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32
    half = crops.normalize_to(got, dtype=torch.bfloat16)
    torch.testing.assert_close(half.float(), x, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="x must be a uint8"):
        crops.normalize_to(x)


def test_train_and_eval_batches_equal_todays_imagenet_items(files):
    """The whole path against build_datasets('imagenet'): its PIL loader + v2 transforms, with the global
    RNG seeded as crop_seed seeds each item, give the same tensors."""
    bundle = build_datasets("imagenet", files)
    ds = jpeg.FileBytesDataset.from_folder(files / "train")
    items = [ds[k] for k in range(len(ds))]
    data, indices = [d for d, _, _ in items], [i for _, _, i in items]
    x, fallback = jpeg.train_batch(data, indices, seed=3, epoch=1, device="cpu")
    assert fallback == 1 and x.shape == (len(ds), 3, 224, 224)
    with torch.random.fork_rng():
        for k in indices:
            torch.manual_seed(crops.crop_seed(3, 1, k))
            torch.testing.assert_close(x[k], bundle.train[k][0], rtol=0, atol=1e-5)
    val = jpeg.FileBytesDataset.from_folder(files / "val")
    y, _ = jpeg.eval_batch([val[k][0] for k in range(len(val))], "cpu")
    for k in range(len(val)):
        torch.testing.assert_close(y[k], bundle.val[k][0], rtol=0, atol=1e-5)


def test_center_crops_equal_v2_resize_and_center_crop():
    images = [torch.from_numpy(textured(h, w, w)).permute(2, 0, 1).contiguous() for h, w in [(375, 500), (301, 227)]]
    ref = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])
    got = crops.center_crops(images)
    for k, img in enumerate(images):
        assert torch.equal(got[k], ref(img))


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="heights, widths and indices"):
        crops.random_resized_crop_boxes([10, 10], [10], 0, 0, [0, 1])
    with pytest.raises(ValueError, match="boxes must be"):
        crops.resized_crops([torch.zeros(3, 8, 8, dtype=torch.uint8)], torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask must be"):
        crops.flip_(torch.zeros(2, 3, 4, 4), torch.tensor([True]))
    with pytest.raises(ValueError, match="mode must be"):
        jpeg.decode_batch([], "cpu", mode=jpeg.ImageReadMode.RGB_ALPHA)


def test_a_failing_batch_is_decoded_file_by_file(files, monkeypatch):
    """decode_jpeg fails a whole batch for one file it rejects: the others still go through it, that one
    through PIL, and only it is counted."""
    ds = jpeg.FileBytesDataset.from_folder(files / "train")
    data = [ds[k][0] for k in range(3)]
    real = jpeg.decode_jpeg

    def rejects_item_1(arg, **kw):
        if isinstance(arg, list) or arg is data[1]:
            raise RuntimeError("rejected")
        return real(arg, **kw)

    monkeypatch.setattr(jpeg, "decode_jpeg", rejects_item_1)
    images, fallback = jpeg.decode_batch(data, "cpu")
    assert fallback == 1
    for img, raw in zip(images, data):
        assert (img.int() - pil_rgb(bytes(raw.numpy())).int()).abs().max() <= MAX_DIFF_CMYK
