"""The fused KD loss (kernels/kd_loss.py) and its eager twin, against the float64 reference (Eq. 1).

The kernel runs on TRITON_DEVICE: the GPU, or Triton's interpreter on the CPU (few rows, wide blocks).
"""
import math

import pytest
import torch

from helpers import TRITON_DEVICE, compiled_in_subprocess, make_logits, on_triton_device
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


@pytest.mark.parametrize("bad,err,match", [
    (lambda s, t: (s, t[:, :-1], 4.0), ValueError, "`teacher_logits` must match `student_logits`"),
    (lambda s, t: (s[0], t[0], 4.0), ValueError, "`student_logits` must be a 2-D"),
    (lambda s, t: (s, t.long(), 4.0), ValueError, "`teacher_logits` must be a 2-D"),
    (lambda s, t: (s[:0], t[:0], 4.0), ValueError, "B, C >= 1"),
    (lambda s, t: (s, t, 0.0), ValueError, "`temperature` must be a finite number > 0"),
    (lambda s, t: (s, t, float("inf")), ValueError, "`temperature`"),
    (lambda s, t: (s, t, 1e-40), ValueError, "`temperature` must be at least"),  # 1/T overflows float32
    (lambda s, t: (s, t, True), TypeError, "`temperature`"),
])
@pytest.mark.parametrize("fn", [kl_distill, kl_distill_fused], ids=["kl_distill", "fused"])
def test_bad_input_is_refused_naming_the_argument(bad, err, match, fn):
    s, t = make_logits(3, 5, seed=9), make_logits(3, 5, seed=10)
    with pytest.raises(err, match=match):
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


def test_kernel_compiles_for_hopper():
    """Compiled ahead of time for sm_90 (no GPU needed; outside the interpreter, so in a subprocess), in
    each variant the trainer launches on contiguous [256, 1000] rows: the online KD step (bf16 logits,
    CE), the cached dense step (fp16 buffer rows gathered by index), top-k read-back rows (fp32
    probabilities), and the KL alone (kl_distill) in fp32 and fp16."""
    code = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kcd_fast.kernels.kd_loss import _kd_loss_kernel, block_size
PTRS = ("s_ptr", "t_ptr", "idx_ptr", "y_ptr", "loss_ptr", "grad_ptr")
FLOATS = ("inv_t", "t_scale", "kd_loss_scale", "kd_grad_scale", "ce_scale")
out = {}
for name, (s_dt, t_dt, probs, gather, ce) in {
        "online_kd_bf16": ("bf16", "bf16", False, False, True),
        "cached_dense_kd_bf16": ("bf16", "fp16", True, True, True),
        "topk_readback_kd_bf16": ("bf16", "fp32", True, False, True),
        "kl_fp32": ("fp32", "fp32", False, False, False),
        "kl_fp16": ("fp16", "fp16", False, False, False)}.items():
    consts = {"stride_sc": 1, "stride_tc": 1, "BLOCK_C": block_size(1000), "TEACHER_PROBS": probs,
              "GATHER": gather, "HAS_CE": ce}
    sig, attrs = {}, {}
    for i, arg in enumerate(_kd_loss_kernel.arg_names):
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg in PTRS:
            sig[arg] = {"s_ptr": "*" + s_dt, "t_ptr": "*" + t_dt, "idx_ptr": "*i64", "y_ptr": "*i64",
                        "loss_ptr": "*fp32", "grad_ptr": "*bf16" if s_dt == "bf16" else "*fp32"}[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[arg] = "fp32" if arg in FLOATS else "i32"
    k = triton.compile(ASTSource(fn=_kd_loss_kernel, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    out[name] = k.asm["ptx"].count("st.global")
print(json.dumps(out))
"""
    stores = compiled_in_subprocess(code)
    # 4 warps over a 1024-wide block: 8 gradient stores a thread, and the row's loss.
    assert stores == dict.fromkeys(("online_kd_bf16", "cached_dense_kd_bf16", "topk_readback_kd_bf16", "kl_fp32",
                                    "kl_fp16"), 9)


# --------------------------------------------------------------------------- the whole KD loss: CE + KL

def _cfg(temperature=4.0, ce_weight=0.1, kd_weight=0.9):
    from types import SimpleNamespace

    return SimpleNamespace(kd_temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight)


def _labels(b, c, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (b,), generator=g)
    if b >= 4:
        y[3] = y[0]  # a repeated label
    return y


def _reference_kd(s, t_logits, y, cfg):
    leaf = s.detach().cpu().double().requires_grad_(True)
    loss = R.vanilla_kd_loss(leaf, t_logits.detach().cpu(), y.cpu(), cfg.kd_temperature, cfg.ce_weight, cfg.kd_weight)
    loss.backward()
    return loss.detach(), leaf.grad


def _grad_of(fn, s, *args, keep_device=False):
    """fn(leaf, *args) and d/d leaf; a strided ``s`` keeps its strides, on the Triton device unless ``keep_device``."""
    if s.is_contiguous():
        leaf = s.detach().clone().requires_grad_(True)
    else:
        leaf = (s.detach() if keep_device else on_triton_device(s.detach())).requires_grad_(True)
    loss = fn(leaf, *args)
    loss.backward()
    assert leaf.grad.dtype == s.dtype and leaf.grad.shape == s.shape
    return loss.detach().cpu().double(), leaf.grad.cpu().double()


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 129), (4, 1000)])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("weights", [(0.1, 0.9, 4.0), (1.0, 0.0, 1.0), (0.0, 1.0, 2.0)], ids=["kd", "ce_only", "kl_only"])
def test_fused_kd_loss_with_ce_matches_the_float64_reference(dtype, atol, rtol, shape, strided, weights):
    """The trainer's ``kd`` loss, ce_w CE + kd_w T^2 KL, in one kernel (kcd_fast.distill._fused with labels)."""
    import kcd_fast.distill as D

    b, c = shape
    cfg = _cfg(temperature=weights[2], ce_weight=weights[0], kd_weight=weights[1])
    s = make_logits(b, c, dtype=dtype, seed=21, strided=strided)
    t = make_logits(b, c, dtype=dtype, seed=22, strided=strided, scale=5.0)
    if b >= 3:
        s[2], t[2] = s[0], t[0]  # a repeated row
    y = _labels(b, c, 23)
    want_loss, want_grad = _reference_kd(s, t, y, cfg)
    got_loss, got_grad = _grad_of(lambda x, tt, yy: D._fused(x, tt, cfg.kd_temperature, yy, cfg.ce_weight, cfg.kd_weight),
                                  on_triton_device(s), on_triton_device(t), y.to(TRITON_DEVICE))
    torch.testing.assert_close(got_loss, want_loss, atol=atol, rtol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_eager_kd_loss_twin_matches_the_float64_reference(dtype, atol, rtol):
    from kcd_fast.distill import kd_loss, kd_loss_torch

    cfg = _cfg()
    s = make_logits(6, 37, dtype=dtype, seed=24, strided=True)
    t = make_logits(6, 37, dtype=dtype, seed=25)
    y = _labels(6, 37, 26)
    want_loss, want_grad = _reference_kd(s, t, y, cfg)
    for fn in (kd_loss_torch, kd_loss):  # on CPU tensors the registered loss is the twin
        # keep_device: the strided student stays on the CPU beside t and y, also where a GPU is present
        got_loss, got_grad = _grad_of(lambda x: fn(x, t, y, cfg, 0), s, keep_device=True)
        torch.testing.assert_close(got_loss, want_loss, atol=atol, rtol=1e-5)
        torch.testing.assert_close(got_grad, want_grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("block_c", [16, 32])
def test_ce_and_kl_carry_across_chunks(block_c):
    """C = 37 in chunks of 16 or 32, with the label, the maxima and huge logits in different chunks."""
    from kcd_fast.kernels.kd_loss import kd_loss_triton

    cfg = _cfg(temperature=2.0, ce_weight=0.3, kd_weight=0.7)
    s = make_logits(3, 37, seed=27, scale=8.0)
    t = make_logits(3, 37, seed=28, scale=8.0)
    s[1, 3], t[2, 1] = 300.0, 250.0  # maxima in the first chunk that overflow exp unless carried over
    y = torch.tensor([36, 0, 20])
    want_loss, want_grad = _reference_kd(s, t, y, cfg)
    losses, grad = kd_loss_triton(on_triton_device(s), on_triton_device(t), 2.0, target=y.to(TRITON_DEVICE),
                                  ce_weight=0.3, kd_weight=0.7, block_c=block_c)
    torch.testing.assert_close(losses.sum().cpu().double(), want_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.cpu().double(), want_grad, atol=1e-6, rtol=1e-5)


def test_a_label_or_a_buffer_row_out_of_range_gives_its_row_nan_and_reads_nothing():
    """Unchecked on CUDA outside debug mode, so the kernel itself must not read outside the tensors:
    such a row's loss and gradient are NaN (visible in the loss), the other rows are exact."""
    from kcd_fast.kernels.kd_loss import kd_loss_triton

    s = make_logits(5, 9, seed=29)
    probs = torch.softmax(make_logits(4, 9, seed=30), dim=1)
    idx = torch.tensor([0, 4, -1, 3, 2])
    y = torch.tensor([1, 2, 3, 9, -1])
    losses, grad = kd_loss_triton(on_triton_device(s), on_triton_device(probs), 4.0, teacher_is_probs=True,
                                  teacher_index=idx.to(TRITON_DEVICE), target=y.to(TRITON_DEVICE), ce_weight=0.1,
                                  kd_weight=0.9)
    losses, grad = losses.cpu(), grad.cpu()
    assert torch.isnan(losses[1:]).all() and torch.isnan(grad[1:]).all()
    want = R.vanilla_kd_loss(s[:1], R.stored_teacher_logits(probs[:1], 4.0), y[:1], 4.0, 0.1, 0.9) / 5
    assert losses[0].item() == pytest.approx(want.item(), rel=1e-5) and torch.isfinite(grad[0]).all()


# --------------------------------------------------------------------------- the loss from a knowledge buffer

def _buffer(storage, dtype, temperature, n=13, c=37, seed=31):
    """A buffer on TRITON_DEVICE with every row written but the last (unfilled: zeros), one row with
    zero probabilities (floored at 1e-20), and top-k rows whose remainder is spread uniformly."""
    from kcd_fast.knowledge import KnowledgeBuffer

    kb = KnowledgeBuffer(n, c, storage=storage, k=5, dtype=dtype, temperature=temperature, device=TRITON_DEVICE)
    logits = make_logits(n - 1, c, seed=seed, scale=6.0)
    logits[2, :10] = -1e4  # probabilities that underflow to 0 in any dtype
    kb.write(torch.arange(n - 1), logits)
    return kb


@pytest.mark.parametrize("storage", ["dense", "topk"])
@pytest.mark.parametrize("buffer_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("temperatures", [(4.0, 4.0), (2.0, 4.0)], ids=["same_T", "buffer_T2_loss_T4"])
def test_kd_loss_from_knowledge_reads_the_buffer_in_place_as_its_twin_and_the_reference(
        storage, buffer_dtype, index_dtype, temperatures):
    """The fused read of the buffer's rows by index (dense) or of the top-k read-back rows gives what the
    trainer's generic path gives (kd_loss on knowledge.teacher_logits(index)) and the float64 reference on
    the stored rows: repeated indices, an unfilled row, zero probabilities, a buffer at another T."""
    from kcd_fast.distill import kd_loss_from_knowledge_fused, kd_loss_torch

    t_buffer, t_loss = temperatures
    kb = _buffer(storage, buffer_dtype, t_buffer)
    cfg = _cfg(temperature=t_loss)
    idx = torch.tensor([2, 5, 12, 5, 0, 7, 11], dtype=index_dtype)  # 12: unfilled; 5 twice
    s = make_logits(7, 37, dtype=torch.bfloat16, seed=32)
    y = _labels(7, 37, 33)
    stored = kb.read(idx.to(TRITON_DEVICE)).cpu()
    want_loss, want_grad = _reference_kd(s, R.stored_teacher_logits(stored, t_buffer), y, cfg)
    got_loss, got_grad = _grad_of(lambda x: kd_loss_from_knowledge_fused(x, kb, idx, y.to(TRITON_DEVICE), cfg, 0),
                                  s.to(TRITON_DEVICE))
    twin_loss, twin_grad = _grad_of(lambda x: kd_loss_torch(x, kb.teacher_logits(idx), y.to(TRITON_DEVICE), cfg, 0),
                                    s.to(TRITON_DEVICE))
    for loss, grad in ((got_loss, got_grad), (twin_loss, twin_grad)):
        torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, want_grad, atol=1e-5, rtol=1e-2)  # bf16 gradients


def test_kd_loss_from_knowledge_is_the_generic_path_on_the_cpu(monkeypatch):
    """On CPU logits (and on a buffer on another device) it is kd_loss on knowledge.teacher_logits: the
    fused kernel is not called, and the loss is that of the generic path exactly."""
    import kcd_fast.distill as D

    kb = _buffer("dense", torch.float16, 4.0, seed=34)
    kb_cpu = kb if kb.device.type == "cpu" else None
    if kb_cpu is None:
        from kcd_fast.knowledge import KnowledgeBuffer

        kb_cpu = KnowledgeBuffer(13, 37, dtype=torch.float16, temperature=4.0)
        kb_cpu.probs.copy_(kb.probs.cpu())
        kb_cpu.filled.copy_(kb.filled.cpu())
    calls = []
    monkeypatch.setattr(D._FusedKD, "apply", lambda *a: calls.append(a) or torch.zeros(()))
    s, y, idx = make_logits(4, 37, seed=35), _labels(4, 37, 36), torch.tensor([1, 3, 3, 0])
    got = D.kd_loss_from_knowledge(s, kb_cpu, idx, y, _cfg(), 0)
    want = D.kd_loss_torch(s, kb_cpu.teacher_logits(idx), y, _cfg(), 0)
    assert calls == [] and torch.equal(got, want)


@pytest.mark.parametrize("bad,err,match", [
    (lambda s, y, i: (s, y.int(), i), ValueError, "`target` must be an int64 tensor of 4 labels"),
    (lambda s, y, i: (s, y[:3], i), ValueError, "`target` must be an int64 tensor of 4 labels"),
    (lambda s, y, i: (s, [0, 1, 2, 3], i), TypeError, "`target` must be a torch.Tensor"),
    (lambda s, y, i: (s, y + 37, i), ValueError, "`target`"),
    (lambda s, y, i: (s[:, :-1], y, i), ValueError, r"`student_logits` must be \[B, 37\]"),
    (lambda s, y, i: (s, y, i[:3]), ValueError, r"`student_logits` must be \[B, 37\]"),
    (lambda s, y, i: (s, y, i + 13), ValueError, "`indices`"),
    (lambda s, y, i: (s, y, i.float()), TypeError, "`indices`"),
    (lambda s, y, i: (s.long(), y, i), ValueError, "`student_logits` must be a 2-D"),
])
def test_kd_loss_from_knowledge_refuses_bad_input_naming_it(bad, err, match, monkeypatch):
    """Checked before the kernel runs, naming the argument. The contents (a label or an index out of
    range) are checked on the CPU, and on CUDA in debug mode (kcd_fast.ops.set_debug), which this turns on."""
    from kcd_fast import checks
    from kcd_fast.distill import kd_loss_from_knowledge_fused

    monkeypatch.setattr(checks, "_debug", True)
    kb = _buffer("dense", torch.float16, 4.0, seed=37)
    before = kb.probs.clone()
    s, y, idx = make_logits(4, 37, seed=38).to(TRITON_DEVICE), _labels(4, 37, 39).to(TRITON_DEVICE), torch.tensor([1, 3, 3, 0])
    s_, y_, i_ = bad(s, y, idx)
    with pytest.raises(err, match=match):
        kd_loss_from_knowledge_fused(s_, kb, i_, y_, _cfg(), 0)
    assert torch.equal(kb.probs, before)


def test_kd_loss_refuses_bad_labels_on_the_fused_path(monkeypatch):
    import kcd_fast.distill as D

    monkeypatch.setattr(D, "_fusable", lambda s, t: True)  # the CUDA route, on TRITON_DEVICE
    s, t = make_logits(4, 7, seed=40).to(TRITON_DEVICE), make_logits(4, 7, seed=41).to(TRITON_DEVICE)
    with pytest.raises(ValueError, match="`target` must be an int64 tensor of 4 labels"):
        D.kd_loss(s, t, torch.zeros(4, dtype=torch.int32, device=TRITON_DEVICE), _cfg(), 0)
    got = D.kd_loss(s, t, _labels(4, 7, 42).to(TRITON_DEVICE), _cfg(), 0)  # and the fused loss otherwise
    want = R.vanilla_kd_loss(s.cpu(), t.cpu(), _labels(4, 7, 42), 4.0, 0.1, 0.9)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("storage", ["online", "dense", "topk", "kl_distill"])
def test_trainer_kd_loss_fused_and_eager_agree_inside_autocast_on_cuda(storage):
    """The trainer's use on the GPU: bf16 logits from autocast, 0.1 CE + 0.9 KD, gradients into the student;
    the teacher online (kd_loss) or read from a fp16 buffer (kd_loss_from_knowledge), fused against eager;
    and the KL alone (kl_distill, as a --loss-module loss would use it) beside an eager CE. The fused
    step, after a warm-up, issues no host sync (sync-debug mode "error"), as the per-step path must not."""
    import torch.nn.functional as F

    from kcd_fast import distill as D
    from kcd_fast.knowledge import KnowledgeBuffer

    g = torch.Generator().manual_seed(43)
    x = torch.randn(256, 64, generator=g).cuda()
    y = torch.randint(0, 1000, (256,), generator=g).cuda()
    t = (torch.randn(256, 1000, generator=g) * 3).cuda().bfloat16()
    idx = torch.randperm(300, generator=g)[:256].cuda()
    kb = None
    if storage in ("dense", "topk"):
        kb = KnowledgeBuffer(300, 1000, storage=storage, k=10, dtype=torch.float16, temperature=4.0, device="cuda")
        kb.write(idx, t)

    def step(head, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            s = head(x)
            if storage == "kl_distill":
                kl = D.kl_distill_fused if fused else D.kl_distill_torch
                loss = 0.1 * F.cross_entropy(s.float(), y) + 0.9 * kl(s, t, 4.0)
            elif kb is None:
                loss = D.kd_loss(s, t, y, _cfg(), 0) if fused else D.kd_loss_torch(s, t, y, _cfg(), 0)
            else:
                loss = (D.kd_loss_from_knowledge(s, kb, idx, y, _cfg(), 0) if fused
                        else D.kd_loss_torch(s, kb.teacher_logits(idx), y, _cfg(), 0))
        loss.backward()
        return loss.detach()

    grads = []
    for fused in (True, False):
        torch.manual_seed(0)
        head = torch.nn.Linear(64, 1000).cuda()
        if fused:
            step(head, True)  # warm-up: compiles the kernel
            head.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss = step(head, fused)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        grads.append((loss, head.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-4, rtol=1e-2)


def test_fp16_gradients_keep_their_precision_under_a_loss_scale():
    """fp16 training scales the loss (GradScaler) because gradients like T / B (q - p) ~ 1e-5 are
    subnormal in fp16: the kernel's gradient must be scaled before it is rounded to fp16, not after."""
    import kcd_fast.distill as D

    b, c = 64, 1000
    s = make_logits(b, c, dtype=torch.float16, seed=44, scale=1.0)
    t = make_logits(b, c, dtype=torch.float16, seed=45, scale=1.0)
    y = _labels(b, c, 46)
    _, want_grad = _reference_kd(s, t, y, _cfg())
    leaf = on_triton_device(s).requires_grad_(True)
    (D._fused(leaf, on_triton_device(t), 4.0, y.to(TRITON_DEVICE), 0.1, 0.9) * 65536.0).backward()
    assert leaf.grad.dtype == torch.float16
    torch.testing.assert_close(leaf.grad.cpu().double() / 65536.0, want_grad, atol=1e-9, rtol=2e-3)
