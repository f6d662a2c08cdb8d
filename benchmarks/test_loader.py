"""The JPEG input paths per image, at small size (CI): today's PIL + v2 transforms item by item,
against bytes + batched ``decode_jpeg`` + batched crop and flip (:mod:`kcd_fast.jpeg`), both on one
CPU thread over the same 32 synthetic ImageNet-like JPEGs. The bound (docs/jpeg-input.md): the new
path >= 1.4x the images/s of today's; ``benchmarks/loader_cpu.py`` measures it at size, alternating
the two paths batch by batch."""
import pytest
import torch

from benchmarks.loader_cpu import write_folder
from kcd_fast import crops, jpeg
from kcd_fast.data import build_datasets

N = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    write_folder(root, N)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_loader_pil_v2(benchmark, folder):
    today = build_datasets("imagenet", str(folder)).train
    benchmark.extra_info["images"] = N
    benchmark.pedantic(lambda: [today[i] for i in range(N)], rounds=3, iterations=1)


def test_loader_bytes_decode_crop(benchmark, folder):
    files = jpeg.FileBytesDataset.from_folder(folder / "train")
    benchmark.extra_info["images"] = N

    def batch():
        data, labels, indices = jpeg.collate_bytes([files[i] for i in range(N)])
        images, _ = jpeg.decode_batch(data, "cpu")
        boxes, flips = crops.random_resized_crop_boxes([im.shape[-2] for im in images],
                                                      [im.shape[-1] for im in images], 0, 0, indices)
        return crops.flip_(crops.resized_crops(images, boxes), flips)

    benchmark.pedantic(batch, rounds=3, iterations=1)
