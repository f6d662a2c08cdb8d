"""The fused KD loss (kernels/kd_loss.py) and its eager twin, against the float64 reference (Eq. 1).

The kernel runs on TRITON_DEVICE: the GPU, or Triton's interpreter on the CPU (few rows, wide blocks).
"""
import math

import pytest
import torch

from helpers import TRITON_DEVICE, make_logits, on_triton_device
from kcd_fast import reference as R
from kcd_fast.distill import kl_distill, kl_distill_fused, kl_distill_torch

# (dtype, atol, rtol) for the loss and the gradient; the math is float32 everywhere, the gradient is
# returned in the student's dtype.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-5, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-5, 1e-2, id="bf16"),
]
SHAPES = [(1, 1), (3, 7), (2, 129), (4, 1000)]


def _reference(s, t, temperature):
    """Loss and gradient (w.r.t. the student's logits) of the float64 reference, on the very values given."""
    leaf = s.detach().cpu().double().requires_grad_(True)
    loss = R.kd_loss(leaf, t.detach().cpu(), temperature)
    loss.backward()
    return loss.detach(), leaf.grad


def _fused(s, t, temperature):
    leaf = on_triton_device(s.detach()).requires_grad_(True)
    loss = kl_distill_fused(leaf, on_triton_device(t), temperature)
    loss.backward()
    assert leaf.grad.dtype == s.dtype and leaf.grad.shape == s.shape
    return loss.detach().cpu().double(), leaf.grad.cpu().double()


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_fused_kd_loss_matches_the_float64_reference(dtype, atol, rtol, shape, strided, temperature):
    b, c = shape
    s = make_logits(b, c, dtype=dtype, seed=1, strided=strided)
    t = make_logits(b, c, dtype=dtype, seed=2, strided=strided, scale=5.0)
    if b >= 3:
        s[2], t[2] = s[0], t[0]  # a repeated row
    want_loss, want_grad = _reference(s, t, temperature)
    got_loss, got_grad = _fused(s, t, temperature)
    torch.testing.assert_close(got_loss, want_loss, atol=atol, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_eager_twin_matches_the_float64_reference(dtype, atol, rtol):
    s = make_logits(5, 37, dtype=dtype, seed=3, strided=True).requires_grad_(True)
    t = make_logits(5, 37, dtype=dtype, seed=4)
    want_loss, want_grad = _reference(s, t, 4.0)
    loss = kl_distill_torch(s, t, 4.0)
    loss.backward()
    torch.testing.assert_close(loss.detach().double(), want_loss, atol=atol, rtol=1e-5)
    torch.testing.assert_close(s.grad.double(), want_grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("block_c", [16, 32])
def test_rows_wider_than_a_block_are_done_in_chunks(block_c):
    """C = 37 in chunks of 16 or 32: the maxima, the sums and the terms carry across chunks."""
    from kcd_fast.kernels.kd_loss import kd_loss_triton

    s = make_logits(3, 37, seed=5, scale=8.0)
    t = make_logits(3, 37, seed=6, scale=8.0)
    t[1, 30:] = -30.0  # the row's maximum in the first chunk, much smaller values in the last
    s[1, 3], t[2, 1] = 300.0, 250.0  # maxima in the first chunk that overflow exp unless carried over
    want_loss, want_grad = _reference(s, t, 2.0)
    losses, grad = kd_loss_triton(on_triton_device(s), on_triton_device(t), 2.0, block_c=block_c)
    torch.testing.assert_close(losses.sum().cpu().double(), want_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), want_grad, atol=1e-6, rtol=1e-5)
    rows = torch.stack([R.kd_loss(s[i:i + 1], t[i:i + 1], 2.0) for i in range(3)]) / 3  # each row's share
    torch.testing.assert_close(losses.cpu().double(), rows, atol=1e-6, rtol=1e-5)


def test_zero_and_non_finite_probabilities_follow_kl_div():
    """A class the teacher gives no probability (a -inf logit) adds 0; a row of NaN, or an all -inf
    teacher row, gives NaN; p = 0 with q = 0 (both -inf) gives NaN, as F.kl_div's 0 * -inf does.
    The fused loss, its eager twin and the reference agree on each case, row by row."""
    from kcd_fast.kernels.kd_loss import kd_loss_triton

    s = make_logits(5, 9, seed=7)
    t = make_logits(5, 9, seed=8)
    t[0, :4] = float("-inf")                 # zero probabilities: finite
    t[1, :] = float("-inf")                  # no teacher distribution: NaN
    s[2, 5] = float("nan")                   # NaN: NaN
    s[3, 1], t[3, 1] = float("-inf"), float("-inf")  # p = 0 and q = 0: NaN
    t[4, 2] = float("inf")                   # +inf: NaN
    losses, _ = kd_loss_triton(on_triton_device(s), on_triton_device(t), 1.0)
    for i in range(5):
        want = R.kd_loss(s[i:i + 1], t[i:i + 1], 1.0).item() / 5
        twin = kl_distill_torch(s[i:i + 1], t[i:i + 1], 1.0).item() / 5
        got = losses[i].item()
        if i == 0:
            assert math.isfinite(want) and got == pytest.approx(want, rel=1e-5) and twin == pytest.approx(want, rel=1e-5)
        else:
            assert math.isnan(want) and math.isnan(got) and math.isnan(twin), i


@pytest.mark.parametrize("bad,match", [
    (lambda s, t: (s, t[:, :-1], 4.0), "`teacher_logits` must match `student_logits`"),
    (lambda s, t: (s[0], t[0], 4.0), "`student_logits` must be a 2-D"),
    (lambda s, t: (s, t.long(), 4.0), "`teacher_logits` must be a 2-D"),
    (lambda s, t: (s[:0], t[:0], 4.0), "B, C >= 1"),
    (lambda s, t: (s, t, 0.0), "`temperature` must be a positive finite number"),
    (lambda s, t: (s, t, float("inf")), "`temperature`"),
    (lambda s, t: (s, t, True), "`temperature`"),
])
@pytest.mark.parametrize("fn", [kl_distill, kl_distill_fused], ids=["kl_distill", "fused"])
def test_bad_input_is_refused_naming_the_argument(bad, match, fn):
    s, t = make_logits(3, 5, seed=9), make_logits(3, 5, seed=10)
    with pytest.raises(ValueError, match=match):
        fn(*bad(s, t))


def test_the_trainer_losses_reach_the_fused_kernel_on_cuda_only(monkeypatch):
    """kl_distill picks the fused kernel for CUDA tensors (a frozen teacher) and the eager twin on the CPU."""
    import kcd_fast.distill as D

    calls = []
    monkeypatch.setattr(D, "_fused", lambda *a: calls.append("fused") or torch.zeros(()))
    s, t = make_logits(3, 5, seed=11), make_logits(3, 5, seed=12)
    D.kl_distill(s, t, 4.0)
    assert calls == []
    if torch.cuda.is_available():
        D.kl_distill(s.cuda(), t.cuda(), 4.0)
        assert calls == ["fused"]
        D.kl_distill(s.cuda(), t.cuda().requires_grad_(True), 4.0)  # a teacher that takes a gradient
        assert calls == ["fused"]


@pytest.mark.cuda
def test_fused_and_eager_agree_inside_autocast_on_cuda():
    """The trainer's use: bf16 logits from autocast, a 0.1 CE + 0.9 KD mix, gradients into the student."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(13)
    x = torch.randn(256, 64, generator=g).cuda()
    y = torch.randint(0, 1000, (256,), generator=g).cuda()
    t = (torch.randn(256, 1000, generator=g) * 3).cuda().bfloat16()
    grads = []
    for fn in (kl_distill_fused, kl_distill_torch):
        torch.manual_seed(0)
        head = torch.nn.Linear(64, 1000).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            s = head(x)
            loss = 0.1 * F.cross_entropy(s.float(), y) + 0.9 * fn(s, t, 4.0)
        loss.backward()
        grads.append((loss.detach(), head.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-4, rtol=1e-2)


def test_kernel_compiles_for_hopper():
    """Compiled ahead of time for sm_90 (no GPU needed; outside the interpreter, so in a subprocess),
    for each logits dtype, as the launcher would launch it on contiguous [256, 1000] rows."""
    import json
    import os
    import subprocess
    import sys

    code = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kcd_fast.kernels.kd_loss import _kd_loss_kernel, block_size
out = {}
for dt in ("fp32", "bf16", "fp16"):
    sig, attrs, consts = {}, {}, {"stride_sc": 1, "stride_tc": 1, "BLOCK_C": block_size(1000)}
    for i, name in enumerate(_kd_loss_kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("s_ptr", "t_ptr", "loss_ptr", "grad_ptr"):
            sig[name] = ("*" + dt) if name in ("s_ptr", "t_ptr") else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in ("inv_t", "loss_scale", "grad_scale") else "i32"
    k = triton.compile(ASTSource(fn=_kd_loss_kernel, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    out[dt] = k.asm["ptx"].count("st.global")
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stores = json.loads(proc.stdout.splitlines()[-1])
    # 4 warps over a 1024-wide block: 8 gradient stores a thread, and the row's loss.
    assert stores == {"fp32": 9, "bf16": 9, "fp16": 9}
