"""The ImageNet recipe's crop, antialiased bilinear resize, horizontal flip and normalisation of a whole
batch of decoded images in one Triton launch.

Installed as ``kcd_fast.kernels.resized_crop``; :func:`kcd_fast.crops.train_crops` and
:func:`kcd_fast.crops.eval_crops` use it for CUDA images. The eager path (torchvision's
``v2.functional.resized_crop`` image by image, then :func:`kcd_fast.crops.flip_` and
:func:`kcd_fast.crops.normalize_to`) launches four or five kernels per image from Python: about a
thousand launches a batch of 256, which the GPU loader's budget (about 16 ms a batch) cannot carry.

Every output pixel of image b is a pixel of the image's box (top, left, box_h, box_w) resized to
(resize_h, resize_w), read at (out_top + oy, out_left + ox), with ox mirrored when flipped:

* train (RandomResizedCrop + flip): the drawn box resized to size x size, no offset;
* eval (Resize(256) + CenterCrop(224)): the whole image resized so its shorter side is 256, read at the
  centre crop's offset.

The resize is the antialiased bilinear (triangle) filter of ``torch.nn.functional.interpolate(...,
antialias=True)``, PIL's: scale s = box / resize, support max(s, 1), taps j in [int(c - support + 0.5),
int(c + support + 0.5)) around c = s (i + 0.5), weight max(0, 1 - |(j - c + 0.5) / max(s, 1)|)
normalised to sum 1; each output row sum taken along x first, then along y, in float32, as ATen's CUDA
kernel does. The value is rounded half to even to uint8 (torchvision's cast back for uint8 images),
then ``(v / 255 - mean) / std`` in float32 and cast to the output dtype: what ``normalize_to`` gives.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["resized_crops_triton"]

BLOCK = 256  # output pixels per program


@triton.jit
def _span(i, box, resize):
    """The taps of output index ``i`` (float32, in resized coordinates) along an axis of ``box`` source
    pixels resized to ``resize``: first tap, end (exclusive), centre, and 1 / max(scale, 1)."""
    scale = tl.div_rn(box.to(tl.float32), resize.to(tl.float32))
    up = scale < 1.0
    support = tl.where(up, 1.0, scale)
    inv = tl.where(up, 1.0, tl.div_rn(1.0, scale))
    center = scale * (i + 0.5)
    lo = tl.maximum((center - support + 0.5).to(tl.int32), 0)
    hi = tl.minimum((center + support + 0.5).to(tl.int32), box.to(tl.int32))
    return lo, hi, center, inv


@triton.jit
def _weight(j, center, inv):
    """The triangle filter at source pixel ``j`` (before normalisation)."""
    return tl.maximum(1.0 - tl.abs((j.to(tl.float32) - center + 0.5) * inv), 0.0)


@triton.jit
def _total(lo, hi, center, inv, taps):
    """The weights' sum over each pixel's span (1 for an empty span, which only masked lanes have)."""
    total = tl.zeros(lo.shape, tl.float32)
    for t in range(0, taps):
        j = lo + t
        total += tl.where(j < hi, _weight(j, center, inv), 0.0)
    return tl.where(total > 0.0, total, 1.0)


@triton.jit
def _normalized(v, mean, std):
    """Round half to even to a uint8 level, then (v / 255 - mean) / std with IEEE divisions."""
    r = tl.floor(v + 0.5)
    r = tl.where(((r - v) == 0.5) & ((r % 2.0) == 1.0), r - 1.0, r)
    r = tl.minimum(tl.maximum(r, 0.0), 255.0)
    return tl.div_rn(tl.div_rn(r, 255.0) - mean, std), r


@triton.jit
def _resized_crop_kernel(
    src_ptr,                            # uint8: every image [3, H, W] contiguous, one after another
    par_ptr,                            # int64 [B, 12]: kcd_fast.crops.CROP_PARAMS, by position
    out_ptr, stride_ob, stride_oc, stride_oh, stride_ow,  # [B, 3, S, S] out, any strides
    S, NUM_PB,                          # output side, programs per image
    mean0, mean1, mean2, std0, std1, std2,
    NORMALIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // NUM_PB
    p = (pid % NUM_PB) * BLOCK + tl.arange(0, BLOCK)
    pmask = p < S * S
    oy, ox = p // S, p % S
    row = par_ptr + b.to(tl.int64) * 12
    offset, width = tl.load(row), tl.load(row + 2)
    plane = tl.load(row + 1) * width
    top, left, box_h, box_w = tl.load(row + 3), tl.load(row + 4), tl.load(row + 5), tl.load(row + 6)
    resize_h, resize_w = tl.load(row + 7), tl.load(row + 8)
    out_top, out_left, flip = tl.load(row + 9), tl.load(row + 10), tl.load(row + 11)
    rx = tl.where(flip != 0, S - 1 - ox, ox) + out_left
    ry = oy + out_top
    ylo, yhi, ycen, yinv = _span(ry.to(tl.float32), box_h, resize_h)
    xlo, xhi, xcen, xinv = _span(rx.to(tl.float32), box_w, resize_w)
    # This block's widest spans bound its loops: a large image's many taps cost only its own programs.
    taps_y = tl.max(tl.where(pmask, yhi - ylo, 0), axis=0)
    taps_x = tl.max(tl.where(pmask, xhi - xlo, 0), axis=0)
    ytot = _total(ylo, yhi, ycen, yinv, taps_y)
    xtot = _total(xlo, xhi, xcen, xinv, taps_x)
    a0 = tl.zeros((BLOCK,), tl.float32)
    a1 = tl.zeros((BLOCK,), tl.float32)
    a2 = tl.zeros((BLOCK,), tl.float32)
    for ty in range(0, taps_y):
        y = ylo + ty
        ymask = pmask & (y < yhi)
        wy = tl.div_rn(_weight(y, ycen, yinv), ytot)
        base_y = offset + (top + y) * width + left
        r0 = tl.zeros((BLOCK,), tl.float32)
        r1 = tl.zeros((BLOCK,), tl.float32)
        r2 = tl.zeros((BLOCK,), tl.float32)
        for tx in range(0, taps_x):  # one source row's taps along x, then its weight along y
            x = xlo + tx
            m = ymask & (x < xhi)
            wx = tl.where(m, tl.div_rn(_weight(x, xcen, xinv), xtot), 0.0)
            at = src_ptr + base_y + x
            r0 += wx * tl.load(at, mask=m, other=0).to(tl.float32)
            r1 += wx * tl.load(at + plane, mask=m, other=0).to(tl.float32)
            r2 += wx * tl.load(at + 2 * plane, mask=m, other=0).to(tl.float32)
        wy = tl.where(ymask, wy, 0.0)
        a0 += wy * r0
        a1 += wy * r1
        a2 += wy * r2
    dst = out_ptr + b.to(tl.int64) * stride_ob + oy * stride_oh + ox * stride_ow
    n0, v0 = _normalized(a0, mean0, std0)
    n1, v1 = _normalized(a1, mean1, std1)
    n2, v2 = _normalized(a2, mean2, std2)
    if NORMALIZE:
        tl.store(dst, n0.to(out_ptr.dtype.element_ty), mask=pmask)
        tl.store(dst + stride_oc, n1.to(out_ptr.dtype.element_ty), mask=pmask)
        tl.store(dst + 2 * stride_oc, n2.to(out_ptr.dtype.element_ty), mask=pmask)
    else:
        tl.store(dst, v0.to(tl.uint8), mask=pmask)
        tl.store(dst + stride_oc, v1.to(tl.uint8), mask=pmask)
        tl.store(dst + 2 * stride_oc, v2.to(tl.uint8), mask=pmask)


def resized_crops_triton(images: Sequence[torch.Tensor], params: torch.Tensor, size: int, out: torch.Tensor,
                         mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """Launch the kernel on valid inputs: ``images`` uint8 [3, H, W] on one device, ``params`` int64
    [B, 12] host rows of :data:`kcd_fast.crops.CROP_PARAMS` whose offset column is filled here, ``out``
    [B, 3, size, size] on that device (any strides): uint8 (the resized pixels) or a float dtype
    (normalised with ``mean`` and ``std``). Returns ``out``."""
    if not len(images):
        return out
    device = images[0].device
    numel = [img.numel() for img in images]  # host metadata: no sync
    params[:, 0] = torch.tensor([0] + numel[:-1], dtype=torch.int64).cumsum(0)
    flat = torch.cat([img.reshape(-1) for img in images])
    par = params.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else params.to(device)
    num_pb = triton.cdiv(size * size, BLOCK)
    _resized_crop_kernel[(len(images) * num_pb,)](
        flat, par, out, *out.stride(), size, num_pb, *(float(m) for m in mean),
        *(float(s) for s in std), NORMALIZE=out.dtype != torch.uint8, BLOCK=BLOCK, num_warps=4)
    return out
