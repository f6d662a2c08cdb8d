"""The fused crop + antialiased resize + flip + normalise kernel (kernels/resized_crop.py) through
kcd_fast.crops.train_crops / eval_crops, against a float64 reference (torch's antialiased bilinear
interpolation of each crop in double precision, rounded half to even) and against its slow twin,
torchvision's v2 functions image by image.

The kernel runs on TRITON_DEVICE: the GPU, or Triton's interpreter on the CPU (tests/conftest.py).
"""
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from helpers import TRITON_DEVICE, compiled_in_subprocess
from kcd_fast import crops
from kcd_fast.data import IMAGENET_MEAN, IMAGENET_STD

# A rounded value may differ from the float64 one's rounding only where float32 sums can land on
# either side of a half: within TIE of k + 0.5, by one level.
TIE = 1e-3
# One uint8 level in normalised units, at the smallest std.
LEVEL = 1.0 / 255.0 / min(IMAGENET_STD)


def images_of(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.rint(x.numpy()))


def reference_train(img, box, flip, size):
    """float64: the box of ``img`` resized to size x size with antialias, flipped where asked."""
    top, left, h, w = box
    crop = img[None, :, top:top + h, left:left + w].double()
    out = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                          align_corners=False)[0]
    return out.flip(-1) if flip else out


def reference_eval(img, resize, size):
    h, w = img.shape[-2:]
    rh, rw = crops.resized_size(h, w, resize)
    out = torch.nn.functional.interpolate(img[None].double(), size=(rh, rw), mode="bilinear", antialias=True,
                                          align_corners=False)[0]
    top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    return out[:, top:top + size, left:left + size]


def assert_rounds_like(got_u8: torch.Tensor, ref64: torch.Tensor):
    """uint8 ``got_u8`` equals ``ref64`` rounded half to even, except by one level next to a half."""
    expected = round_half_even(ref64)
    diff = (got_u8.double() - expected).abs()
    near_half = ((ref64 - ref64.floor()) - 0.5).abs() < TIE
    assert diff.max() <= 1, f"off by {diff.max()} levels"
    assert not bool((diff > 0)[~near_half].any()), f"{int((diff > 0)[~near_half].sum())} pixels off away from a half"


def on_device(images):
    return [img.to(TRITON_DEVICE) for img in images]


# Sizes: odd, 1-pixel, tall, wide (a 300-wide box into 9 columns: 33x downscale, 70 taps).
TRAIN_CASES = [
    pytest.param([(37, 53), (90, 41), (60, 60)], [[3, 5, 20, 30], [0, 0, 90, 41], [10, 7, 5, 9]], [1, 0, 1], 24,
                 id="odd-up-and-down"),
    pytest.param([(1, 1), (7, 300)], [[0, 0, 1, 1], [2, 0, 4, 300]], [0, 1], 9, id="one-pixel-and-33x-down"),
    pytest.param([(31, 17), (31, 17)], [[0, 0, 31, 17], [4, 3, 11, 13]], [0, 1], 17, id="same-image-twice"),
]


@pytest.mark.parametrize("sizes, boxes, flips, size", TRAIN_CASES)
def test_train_crops_round_like_the_float64_reference(sizes, boxes, flips, size):
    images = images_of(sizes)
    if len(sizes) == 2 and sizes[0] == sizes[1]:
        images[1] = images[0]  # the same tensor twice in a batch
    boxes, flips = torch.tensor(boxes), torch.tensor(flips, dtype=torch.bool)
    table = crops.crop_table(images, boxes, flips, size)
    got = crops.fused_crops(on_device(images), table, size, torch.uint8).cpu()
    assert got.shape == (len(images), 3, size, size) and got.dtype == torch.uint8
    for k, img in enumerate(images):
        assert_rounds_like(got[k], reference_train(img, boxes[k].tolist(), bool(flips[k]), size))


def test_exact_halves_round_to_even_as_torch_round_does():
    """A 1 x 2 image (0, 2) upscaled to 4 columns: weights 3/4 and 1/4 give the exact halves 0.5 and 1.5,
    which round to 0 and 2 (half to even, as torchvision's uint8 cast back), not 1 and 2."""
    img = torch.tensor([0, 2], dtype=torch.uint8).view(1, 1, 2).expand(3, 1, 2).contiguous()
    got = crops.fused_crops(on_device([img]), crops.crop_table([img], torch.tensor([[0, 0, 1, 2]]),
                                                             torch.tensor([False]), 4), 4, torch.uint8)
    assert reference_train(img, [0, 0, 1, 2], False, 4)[0, 0].tolist() == [0.0, 0.5, 1.5, 2.0]
    assert got.cpu()[0, :, 0].tolist() == [[0, 0, 2, 2]] * 3


def test_strided_images_read_like_contiguous_ones():
    """An HWC image seen as CHW (channels-last strides) and a cropped view give what their copies give."""
    hwc = torch.randint(0, 256, (23, 29, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    big = images_of([(40, 50)], seed=5)[0]
    strided = [hwc.permute(2, 0, 1), big[:, 5:30, 7:44]]
    assert not any(img.is_contiguous() for img in strided)
    boxes, flips = torch.tensor([[1, 2, 20, 25], [0, 3, 25, 30]]), torch.tensor([False, True])
    got = crops.train_crops(on_device(strided), boxes, flips, 15, fused=True)
    want = crops.train_crops(on_device([img.contiguous() for img in strided]), boxes, flips, 15, fused=True)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_normalised_output_is_normalize_to_of_the_rounded_pixels(dtype):
    images = images_of([(45, 66), (38, 21)], seed=2)
    boxes, flips = torch.tensor([[3, 9, 30, 40], [0, 0, 38, 21]]), torch.tensor([True, False])
    got = crops.train_crops(on_device(images), boxes, flips, 21, dtype=dtype, fused=True)
    pixels = crops.fused_crops(on_device(images), crops.crop_table(images, boxes, flips, 21), 21, torch.uint8)
    want = crops.normalize_to(pixels.cpu(), IMAGENET_MEAN, IMAGENET_STD, dtype=dtype)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    if got.is_cuda or dtype == torch.float32:
        assert torch.equal(got.cpu(), want)
    else:  # Triton's interpreter casts float32 to 16 bits by truncation, not round-to-nearest: one unit
        torch.testing.assert_close(got, want, rtol=torch.finfo(dtype).eps, atol=0)


def test_train_crops_match_the_v2_twin_within_a_level():
    """The twin (v2 resized_crop on uint8 image by image, flip, normalize_to) rounds with torchvision's
    own arithmetic: the two agree within one uint8 level."""
    images = images_of([(75, 50), (33, 61), (120, 90)], seed=6)
    boxes, flips = crops.random_resized_crop_boxes([75, 33, 120], [50, 61, 90], seed=0, epoch=2, indices=[4, 8, 15])
    fused = crops.train_crops(on_device(images), boxes, flips, 32, fused=True).cpu()
    twin = crops.train_crops(images, boxes, flips, 32, fused=False)
    torch.testing.assert_close(fused, twin, rtol=0, atol=LEVEL * 1.001)


@pytest.mark.parametrize("sizes", [[(30, 41), (41, 30)], [(26, 26), (25, 80)]], ids=["landscape-portrait", "square-wide"])
def test_eval_crops_round_like_the_float64_reference_and_match_v2(sizes):
    """Resize(26) + CenterCrop(25) of small images (a 26-sided square is left as it is, as v2 does)."""
    images = images_of(sizes, seed=7)
    got = crops.fused_crops(on_device(images), crops.center_table(images, 26, 25), 25, torch.uint8).cpu()
    for k, img in enumerate(images):
        assert_rounds_like(got[k], reference_eval(img, 26, 25))
        v2_float = F.center_crop(F.resize(img.float(), [26], antialias=True), [25, 25])
        assert (got[k].double() - round_half_even(v2_float.double())).abs().max() <= 1
    fused = crops.eval_crops(on_device(images), 26, 25, fused=True).cpu()
    twin = crops.eval_crops(images, 26, 25, fused=False)
    torch.testing.assert_close(fused, twin, rtol=0, atol=LEVEL * 1.001)


def test_resized_size_is_v2s():
    for h, w in [(375, 500), (500, 375), (256, 300), (333, 257), (100, 100)]:
        assert list(crops.resized_size(h, w, 256)) == list(F.resize(torch.zeros(1, h, w), [256]).shape[-2:])


def test_an_empty_batch_gives_an_empty_tensor():
    out = crops.train_crops([], torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, dtype=torch.bool), fused=True)
    assert out.shape == (0, 3, 224, 224)


@pytest.mark.parametrize("bad, match", [
    (lambda imgs: [imgs[0].float()], r"images\[0\] must be a uint8 \[3, H, W\]"),
    (lambda imgs: [imgs[0], imgs[0][:1]], r"images\[1\] must be a uint8 \[3, H, W\]"),
])
def test_bad_images_are_refused_naming_them(bad, match):
    images = images_of([(10, 12)])
    boxes = torch.zeros(len(bad(images)), 4, dtype=torch.int64) + torch.tensor([0, 0, 5, 5])
    with pytest.raises(ValueError, match=match):
        crops.train_crops(bad(images), boxes, torch.zeros(len(boxes), dtype=torch.bool), 8, fused=True)


def test_box_and_flip_shapes_are_checked():
    images = images_of([(10, 12), (10, 12)])
    with pytest.raises(ValueError, match=r"boxes must be \[2, 4\] and flips \[2\]"):
        crops.train_crops(images, torch.zeros(1, 4, dtype=torch.int64), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="resize must be >= size"):
        crops.eval_crops(images, 8, 9, fused=True)


def test_parameter_rows_name_their_columns():
    """Each transform's rows, column by column (kernels/resized_crop.py loads them in CROP_PARAMS order)."""
    images = images_of([(10, 12), (30, 20)])
    train = crops.crop_table(images, torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), torch.tensor([True, False]), 9)
    col = {name: train[:, k].tolist() for k, name in enumerate(crops.CROP_PARAMS)}
    assert col == {"offset": [0, 0], "height": [10, 30], "width": [12, 20], "top": [1, 5], "left": [2, 6],
                   "box_h": [3, 7], "box_w": [4, 8], "resize_h": [9, 9], "resize_w": [9, 9], "out_top": [0, 0],
                   "out_left": [0, 0], "flip": [1, 0]}
    center = crops.center_table(images, 16, 14)
    col = {name: center[:, k].tolist() for k, name in enumerate(crops.CROP_PARAMS)}
    assert col == {"offset": [0, 0], "height": [10, 30], "width": [12, 20], "top": [0, 0], "left": [0, 0],
                   "box_h": [10, 30], "box_w": [12, 20], "resize_h": [16, 24], "resize_w": [19, 16],
                   "out_top": [1, 5], "out_left": [2, 1], "flip": [0, 0]}
    assert crops.crop_table([], torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, dtype=torch.bool), 9).shape \
        == (0, len(crops.CROP_PARAMS))
    with pytest.raises(ValueError, match=r"columns must be among .*got \['flipped'\]"):
        crops.param_table(flipped=[1])


def test_kernel_compiles_for_hopper_with_ieee_divisions():
    """Compiled ahead of time for sm_90 (no GPU needed) for uint8, fp32 and bf16 output: every division
    is IEEE round-to-nearest (div.rn), so the normalisation equals normalize_to's float32 arithmetic."""
    code = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kcd_fast.kernels.resized_crop import _resized_crop_kernel as kern, BLOCK
out = {}
for dt in ("u8", "fp32", "bf16"):
    ptrs = {"src_ptr": "*u8", "par_ptr": "*i64", "out_ptr": "*" + dt}
    consts = {"NORMALIZE": dt != "u8", "BLOCK": BLOCK}
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "fp32" if a.startswith(("mean", "std")) else "i32")
           for a in kern.arg_names}
    ptx = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4}).asm["ptx"]
    out[dt] = [ptx.count("div.rn.f32") > 0, ptx.count("div.full") + ptx.count("div.approx")]
print(json.dumps(out))
"""
    assert compiled_in_subprocess(code) == {"u8": [True, 0], "fp32": [True, 0], "bf16": [True, 0]}


@pytest.mark.cuda
def test_fused_crops_on_cuda_equal_v2_on_cuda_images():
    """On CUDA torchvision resizes uint8 through float32 and rounds: the same arithmetic as the kernel."""
    images = images_of([(375, 500), (500, 333), (64, 1200)], seed=8)
    boxes, flips = crops.random_resized_crop_boxes([375, 500, 64], [500, 333, 1200], seed=1, epoch=0, indices=[0, 1, 2])
    cuda = [img.cuda() for img in images]
    got = crops.fused_crops(cuda, crops.crop_table(cuda, boxes, flips, 224), 224, torch.uint8)
    for k, (top, left, h, w) in enumerate(boxes.tolist()):
        ref = F.resized_crop(cuda[k], top, left, h, w, [224, 224], antialias=True)
        ref = F.horizontal_flip(ref) if flips[k] else ref
        diff = (got[k].int() - ref.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3
