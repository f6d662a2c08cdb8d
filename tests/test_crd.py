"""CRD (kcd_fast/distillers/crd.py) and its contrastive-score kernels (kernels/crd_scores.py), against
float64 references written here from the paper's equations (Tian et al., ICLR 2020, Sec. 3.1).

The kernels run on TRITON_DEVICE: the GPU, or Triton's interpreter on the CPU (tests/conftest.py).
"""
import math

import pytest
import torch

from helpers import TRITON_DEVICE, compiled_in_subprocess, on_triton_device
from kcd_fast.distillers.base import DISTILLERS, Batch
from kcd_fast.distillers.crd import (CRD, CRDSettings, all_gather_rows, last_occurrence, noise_seed)
from kcd_fast.kernels.crd_scores import (CRDScores, crd_scores, crd_scores_grad_torch, crd_scores_grad_triton,
                                         crd_scores_torch, crd_scores_triton)

# (dtype, rtol of the gradient): scores are float32 sums of the given values whatever their dtype; the
# gradient comes back in v's dtype.
DTYPES = [pytest.param(torch.float32, 1e-5, id="fp32"), pytest.param(torch.float16, 1e-3, id="fp16"),
          pytest.param(torch.bfloat16, 1e-2, id="bf16")]
SHAPES = [(5, 7, 13, 11), (3, 128, 1, 40), (4, 200, 37, 29)]  # (B, d, K, N): odd, K = 1, d over two blocks


def _inputs(b, d, k, n, dtype, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(b, d, generator=g).to(dtype)
    memory = torch.randn(n, d, generator=g).to(dtype)
    idx = torch.randint(0, n, (b, k + 1), generator=g)
    idx[:, 0] = torch.arange(b) % n
    if k >= 2:
        idx[0, 2] = idx[0, 1]   # a repeated index in a row
    if b >= 2:
        idx[1, :] = idx[0, :]   # a repeated row
    v, memory, idx = on_triton_device(v), memory.to(TRITON_DEVICE), idx.to(TRITON_DEVICE)
    if strided:
        v = on_triton_device(v.cpu().clone().t().contiguous().t())  # column-major: strides (1, B)
        assert not v.is_contiguous() or b == 1
    return v, memory, idx


def _reference(v, memory, idx, grad_scores):
    """float64 scores and grad wrt v of sum(scores * grad_scores)."""
    leaf = v.detach().cpu().double().requires_grad_(True)
    s = torch.einsum("bkd,bd->bk", memory.cpu().double()[idx.cpu()], leaf)
    (s * grad_scores.cpu().double()).sum().backward()
    return s.detach(), leaf.grad


@pytest.mark.parametrize("dtype,rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=["5x7_k13", "3x128_k1", "4x200_k37"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_fused_scores_and_grad_match_the_float64_reference(dtype, rtol, shape, strided):
    v, memory, idx = _inputs(*shape, dtype, seed=sum(shape), strided=strided)
    gs = torch.randn(idx.shape, generator=torch.Generator().manual_seed(1)).to(TRITON_DEVICE)
    want_s, want_g = _reference(v, memory, idx, gs)
    for fused in (True, False):  # the kernels, then the eager twin
        leaf = v.detach().clone() if v.is_contiguous() else v.detach()
        leaf.requires_grad_(True)
        s = crd_scores(leaf, memory, idx, fused=fused)
        (s * gs).sum().backward()
        assert s.dtype == torch.float32 and s.shape == idx.shape
        assert leaf.grad.dtype == dtype and leaf.grad.shape == v.shape
        torch.testing.assert_close(s.detach().cpu().double(), want_s, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(leaf.grad.cpu().double(), want_g, atol=1e-5, rtol=rtol)


@pytest.mark.parametrize("block_k,block_d,split", [(16, 16, 1), (16, 16, 3), (16, 32, 2)])
def test_blocks_loops_and_slices_carry_over(block_k, block_d, split):
    """K+1 = 41 and d = 37 in blocks of 16 / 32, the backward's rows cut in slices: the same sums."""
    v, memory, idx = _inputs(3, 37, 40, 23, torch.float32, seed=7)
    gs = torch.randn(idx.shape, generator=torch.Generator().manual_seed(2)).to(TRITON_DEVICE)
    want_s, want_g = _reference(v, memory, idx, gs)
    s = crd_scores_triton(v, memory, idx, block_k=block_k, block_d=block_d)
    g = crd_scores_grad_triton(gs, memory, idx, block_k=block_k, block_d=block_d, split=split)
    torch.testing.assert_close(s.cpu().double(), want_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.cpu().double(), want_g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(crd_scores_grad_torch(gs, memory, idx).cpu().double(), want_g, atol=1e-5, rtol=1e-5)


def test_fp16_bank_with_fp32_embeddings_and_a_bf16_gradient():
    """v, memory and the incoming gradient each in its own dtype: float32 arithmetic throughout."""
    v, _, idx = _inputs(4, 24, 9, 17, torch.float32, seed=3)
    memory = torch.randn(17, 24, generator=torch.Generator().manual_seed(4)).half().to(TRITON_DEVICE)
    gs = torch.randn(idx.shape, generator=torch.Generator().manual_seed(5)).bfloat16().to(TRITON_DEVICE)
    want_s, want_g = _reference(v, memory, idx, gs)
    torch.testing.assert_close(crd_scores_triton(v, memory, idx).cpu().double(), want_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(crd_scores_grad_triton(gs, memory, idx).cpu().double(), want_g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(crd_scores_torch(v, memory, idx).cpu().double(), want_s, atol=1e-5, rtol=1e-5)


def test_an_index_outside_the_bank_gives_nan_in_the_raw_launchers():
    v, memory, idx = _inputs(2, 8, 3, 5, torch.float32, seed=6)
    idx[0, 1] = 5
    s = crd_scores_triton(v, memory, idx).cpu()
    g = crd_scores_grad_triton(torch.ones(idx.shape, device=TRITON_DEVICE), memory, idx).cpu()
    assert math.isnan(s[0, 1]) and torch.isfinite(s[0, [0, 2, 3]]).all() and torch.isfinite(s[1]).all()
    assert torch.isnan(g[0]).all() and torch.isfinite(g[1]).all()


def test_a_bank_changed_in_place_before_the_backward_is_refused():
    """CRDScores reads the bank in its backward: autograd's version check refuses one updated since."""
    v, memory, idx = _inputs(2, 8, 3, 5, torch.float32, seed=8)
    leaf = v.clone().requires_grad_(True)
    s = CRDScores.apply(leaf, memory, idx)
    memory.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        s.sum().backward()


@pytest.mark.parametrize("bad,err,match", [
    (lambda v, m, i: (v.long(), m, i), TypeError, "`v` must have dtype"),
    (lambda v, m, i: (v[0], m, i), ValueError, "`v` must be 2-D"),
    (lambda v, m, i: (v, m[:, :-1], i), ValueError, r"`memory` must be \[N, d\] with N >= 1 and d = v.shape\[1\]"),
    (lambda v, m, i: (v, m, i.float()), TypeError, "`idx` must have dtype int32 or int64"),
    (lambda v, m, i: (v, m, i[:-1]), ValueError, r"`idx` must be \[B, K\+1\] with B = v.shape\[0\]"),
    (lambda v, m, i: (v, m, i[:, :0]), ValueError, r"K\+1 >= 1"),
    (lambda v, m, i: (v, m, i + 5), ValueError, r"`idx` must lie in \[0, 5\)"),
    (lambda v, m, i: (v, m.clone().requires_grad_(True), i), ValueError, "`memory` must not require grad"),
])
def test_bad_input_is_refused_naming_the_argument(bad, err, match):
    v, memory, idx = _inputs(2, 8, 3, 5, torch.float32, seed=9)
    with pytest.raises(err, match=match):
        crd_scores(*bad(v.cpu(), memory.cpu(), idx.cpu()))


def test_kernels_compile_for_hopper_with_16_byte_bank_loads():
    """Compiled ahead of time for sm_90 (no GPU needed; outside the interpreter, so in a subprocess) for
    the ImageNet launch (d = 128, K+1 = 16385, B = 256, int64 indices) with fp16 and fp32 banks: the bank
    rows are read 16 bytes a load (ld.global.v4)."""
    code = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kcd_fast.kernels.crd_scores import _scores_kernel, _grad_kernel, forward_config, backward_config
ALIGNED = ("stride_mn", "stride_vb", "stride_ib", "stride_gb", "D")
out = {}
for bank in ("fp16", "fp32"):
    for name, kern, ptrs, cfg in [
            ("fwd", _scores_kernel, {"v_ptr": "*fp32", "m_ptr": "*" + bank, "idx_ptr": "*i64", "out_ptr": "*fp32"},
             forward_config(16385, 128)),
            ("bwd", _grad_kernel, {"g_ptr": "*fp32", "m_ptr": "*" + bank, "idx_ptr": "*i64", "part_ptr": "*fp32"},
             backward_config(256, 16385, 128))]:
        consts = {k: 1 for k in ("stride_vd", "stride_md", "stride_ik", "stride_gk") if k in kern.arg_names}
        consts.update(BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"])
        sig, attrs = {}, {}
        for i, arg in enumerate(kern.arg_names):
            if arg in consts:
                sig[arg] = "constexpr"
            elif arg in ptrs:
                sig[arg] = ptrs[arg]
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[arg] = "i32"
                if arg in ALIGNED:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        k = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg["num_warps"]})
        out[name + "_" + bank] = k.asm["ptx"].count("ld.global.v4")
print(json.dumps(out))
"""
    loads = compiled_in_subprocess(code)
    # forward: 64 x 128 tile over 128 threads, 8 (fp16) or 16 (fp32) 16-byte loads a thread; backward 32 x 128.
    assert loads == {"fwd_fp16": 8, "bwd_fp16": 4, "fwd_fp32": 16, "bwd_fp32": 8}, loads


# --------------------------------------------------------------------------- the distiller

B, N, FS, FT, C = 5, 23, 6, 10, 3   # batch, training set, student / teacher feature sizes, classes
SMALL = CRDSettings(crd_feat_dim=8, crd_nce_k=6, seed=3)


def _crd(settings=SMALL, num_samples=N, fused=False):
    torch.manual_seed(0)  # the heads' initial weights
    m = CRD(settings, {"pooled": torch.Size([B, FS])}, {"pooled": torch.Size([B, FT])}, num_samples=num_samples,
            num_classes=C)
    m.fused = fused
    return m


def _step_inputs(seed, index, b=B):
    g = torch.Generator().manual_seed(seed)
    student = {"pooled": torch.randn(b, FS, generator=g).requires_grad_(True),
               "logits": (torch.randn(b, C, generator=g) * 2).requires_grad_(True)}
    teacher = {"pooled": torch.randn(b, FT, generator=g), "logits": torch.randn(b, C, generator=g) * 2}
    target = torch.randint(0, C, (b,), generator=g)
    return student, teacher, Batch(target=target, index=torch.tensor(index), epoch=0)


def _on(device, student, teacher, batch):
    """A step's inputs on ``device``, the student's outputs as leaves there."""
    return ({k: v.detach().to(device).requires_grad_(True) for k, v in student.items()},
            {k: v.to(device) for k, v in teacher.items()},
            Batch(target=batch.target.to(device), index=batch.index.to(device), epoch=batch.epoch))


def _recorded_draws(m):
    """Wrap m.contrast_indices to record what it returns."""
    drawn, draw = [], m.contrast_indices
    m.contrast_indices = lambda index: drawn.append(draw(index)) or drawn[-1]
    return drawn


def _reference_loss(m, student, teacher, batch, idx, bank_s, bank_t, z, settings=SMALL):
    """CRD's objective in float64 from the paper's equations, with float64 copies of m's heads as leaves.

    v = normalize(W f + b) (g_S, g_T); x = exp(<bank[j], v> / tau) / Z; the critic h = x / (x + K/M + eps)
    (Sec. 3.1, with RepDistiller's eps = 1e-7); L = -(1/B) sum_b [log h(pos) + sum_k log(1 - h(neg_k))], 1 - h
    taken as RepDistiller does, (K/M) / (x + K/M + eps); Z = mean(exp(s / tau)) M from this batch when ``z`` is
    None (CRD's first batch), a constant. Total: gamma CE + beta (L_s + L_t) + alpha T^2 KL(p_T || p_S).
    Returns (loss, leaves, (z_s, z_t))."""
    leaves = {name: p.detach().double().clone().requires_grad_(True) for name, p in m.named_parameters()}
    f_s = student["pooled"].detach().double().requires_grad_(True)
    logits = student["logits"].detach().double().requires_grad_(True)
    leaves["pooled"], leaves["logits"] = f_s, logits

    def embed(head, f):
        h = f @ leaves[f"{head}.linear.weight"].t() + leaves[f"{head}.linear.bias"]
        return h / h.norm(dim=1, keepdim=True)

    v_s, v_t = embed("embed_s", f_s), embed("embed_t", teacher["pooled"].double())
    k, tau, bsz = idx.shape[1] - 1, settings.crd_nce_t, idx.shape[0]
    zs = []

    def direction(v, bank, z_given):
        e = torch.exp(torch.einsum("bkd,bd->bk", bank.double()[idx], v) / tau)
        z_used = e.detach().mean() * N if z_given is None else z_given
        zs.append(float(z_used))
        x = e / z_used
        h = x / (x + k / N + 1e-7)
        one_minus_h = (k / N) / (x + k / N + 1e-7)
        return -(torch.log(h[:, 0]).sum() + torch.log(one_minus_h[:, 1:]).sum()) / bsz

    crd = direction(v_s, bank_t, None if z is None else z[0]) + direction(v_t, bank_s, None if z is None else z[1])
    ce = torch.nn.functional.cross_entropy(logits, batch.target)
    t = settings.kd_temperature
    p_t = torch.softmax(teacher["logits"].double() / t, 1)
    kd = (p_t * (p_t.log() - torch.log_softmax(logits / t, 1))).sum() / bsz * t * t
    loss = settings.ce_weight_crd * ce + settings.crd_weight * crd + settings.kd_weight_crd * kd
    return loss, leaves, zs


def _reference_update(bank, idx, v, mom):
    """bank[idx[p]] = normalize(mom old + (1 - mom) v[p]) for p in order, from the old rows (later wins)."""
    old, new = bank.clone(), bank.clone()
    for p, j in enumerate(idx.tolist()):
        row = mom * old[j] + (1 - mom) * v[p]
        new[j] = row / row.norm()
    return new


def _grads(m, student):
    out = {name: p.grad for name, p in m.named_parameters()}
    out["pooled"], out["logits"] = student["pooled"].grad, student["logits"].grad
    return out


def test_crd_is_registered_with_its_taps_and_the_papers_defaults():
    assert DISTILLERS["crd"] is CRD and CRD.name == "crd" and CRD.Settings is CRDSettings
    assert CRD.student_taps == CRD.teacher_taps == ("pooled",)
    d = CRDSettings()
    assert (d.crd_feat_dim, d.crd_nce_k, d.crd_nce_t, d.crd_nce_mom) == (128, 16384, 0.07, 0.5)
    assert (d.ce_weight_crd, d.kd_weight_crd, d.crd_weight) == (1.0, 0.0, 0.8)
    m = _crd()
    assert m.needs_teacher_features
    stdv = 1 / math.sqrt(8 / 3)
    for bank in (m.memory_s, m.memory_t):
        assert bank.shape == (N, 8) and bank.dtype == torch.float32 and not bank.requires_grad
        assert bank.abs().max() <= stdv and bank.min() < 0 < bank.max()
    assert not torch.equal(m.memory_s, m.memory_t)
    assert torch.equal(_crd().memory_t, m.memory_t)  # seeded: the same banks on every rank


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("kd_weight", [0.0, 0.5], ids=["crd", "crd_kd"])
def test_crd_loss_and_gradient_match_the_float64_reference(fused, kd_weight):
    import dataclasses

    settings = dataclasses.replace(SMALL, kd_weight_crd=kd_weight)
    dev = TRITON_DEVICE if fused else "cpu"  # the kernels: on the GPU, or under the interpreter on the CPU
    m = _crd(settings, fused=fused).to(dev)
    drawn = _recorded_draws(m)
    student, teacher, batch = _on(dev, *_step_inputs(11, [4, 0, 17, 9, 22]))
    bank_s, bank_t = m.memory_s.clone(), m.memory_t.clone()
    loss, logs = m(student, teacher, batch)
    loss.backward()
    want, leaves, zs = _reference_loss(m, student, teacher, batch, drawn[0], bank_s, bank_t, None, settings)
    want.backward()
    torch.testing.assert_close(loss.detach().double(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.z.double().cpu(), torch.tensor(zs, dtype=torch.float64), atol=0, rtol=1e-5)
    assert bool(m.z_set) and set(logs) == {"ce", "crd"} | ({"kd"} if kd_weight else set())
    assert torch.allclose(sum(logs.values()), loss.detach())  # the logs are the loss's weighted terms
    for name, got in _grads(m, student).items():
        torch.testing.assert_close(got.double(), leaves[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_two_steps_draw_noise_update_the_banks_and_keep_z_as_the_float64_reference():
    m = _crd()
    drawn = _recorded_draws(m)
    gen = torch.Generator().manual_seed(noise_seed(SMALL.seed, 0))
    bank_s, bank_t = m.memory_s.double(), m.memory_t.double()
    z = None
    for step, index in enumerate([[4, 0, 17, 9, 22], [9, 1, 9, 13, 1]]):  # the second with repeated indices
        student, teacher, batch = _step_inputs(20 + step, index)
        loss, _ = m(student, teacher, batch)
        noise = torch.randint(0, N, (B, SMALL.crd_nce_k), generator=gen)
        assert torch.equal(drawn[step], torch.cat([torch.tensor(index)[:, None], noise], 1))
        want, leaves, zs = _reference_loss(m, student, teacher, batch, drawn[step], bank_s, bank_t, z)
        torch.testing.assert_close(loss.detach().double(), want.detach(), atol=1e-5, rtol=1e-5)
        z = z or zs  # set by the first step, kept by the second
        torch.testing.assert_close(m.z.double(), torch.tensor(z, dtype=torch.float64), atol=0, rtol=1e-5)
        v_s = leaves["pooled"] @ leaves["embed_s.linear.weight"].t() + leaves["embed_s.linear.bias"]
        v_t = teacher["pooled"].double() @ leaves["embed_t.linear.weight"].t() + leaves["embed_t.linear.bias"]
        bank_s = _reference_update(bank_s, batch.index, (v_s / v_s.norm(dim=1, keepdim=True)).detach(), 0.5)
        bank_t = _reference_update(bank_t, batch.index, (v_t / v_t.norm(dim=1, keepdim=True)).detach(), 0.5)
        torch.testing.assert_close(m.memory_s.double(), bank_s, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(m.memory_t.double(), bank_t, atol=1e-6, rtol=1e-6)
    untouched = sorted(set(range(N)) - {4, 0, 17, 9, 22, 1, 13})
    assert torch.equal(m.memory_s[untouched], _crd().memory_s[untouched])


def test_eval_mode_leaves_banks_and_z_alone():
    m = _crd().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m(*_step_inputs(5, [1, 2, 3, 4, 5]))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_last_occurrence_matches_a_loop():
    idx = torch.tensor([5, 2, 5, 7, 2, 5, 0, 7])
    want = [max(q for q in range(len(idx)) if idx[q] == idx[p]) for p in range(len(idx))]
    assert last_occurrence(idx).tolist() == want
    assert last_occurrence(torch.tensor([3])).tolist() == [0]
    x = torch.arange(6.0).view(3, 2)
    assert all_gather_rows(x, torch.tensor([1, 2, 3]))[0] is x  # one process: unchanged


def test_a_bank_of_another_size_is_refused_in_one_line():
    m = _crd()
    other = _crd(num_samples=N + 7).state_dict()
    with pytest.raises(ValueError, match=r"crd: the state dict's `memory_s` is \[30, 8\] but this run needs "
                                         r"\[num_samples, crd_feat_dim\] = \[23, 8\]") as err:
        m.load_state_dict(other)
    assert "\n" not in str(err.value)
    m.load_state_dict(_crd().state_dict())  # the same size loads
    with pytest.raises(ValueError, match=r"`batch.index` must lie in \[0, 23\)"):
        m(*_step_inputs(5, [1, 2, 3, 4, 23]))
    with pytest.raises(ValueError, match="`crd_nce_k` must be an int >= 1"):
        _crd(CRDSettings(crd_nce_k=0))
    with pytest.raises(ValueError, match=r"`crd_nce_mom` must be a finite number in \[0.0, 1.0\)"):
        _crd(CRDSettings(crd_nce_mom=1.0))


# --------------------------------------------------------------------------- two processes on gloo

DDP_B = 6


def _ddp_steps():
    """Two steps of full-batch inputs and contrast indices (the positives, then K noise draws)."""
    g = torch.Generator().manual_seed(99)
    steps = []
    for step, index in enumerate([[3, 8, 15, 0, 21, 11], [8, 2, 19, 8, 5, 14]]):
        inputs = _step_inputs(40 + step, index, DDP_B)
        noise = torch.randint(0, N, (DDP_B, SMALL.crd_nce_k), generator=g)
        steps.append((inputs, torch.cat([torch.tensor(index)[:, None], noise], 1)))
    return steps


def _run_steps(rows: slice, world: int) -> dict:
    """The rows ``rows`` of each step, with the gradient averaged over the processes as DDP does."""
    import torch.distributed as dist

    m = _crd()
    out = {"loss": [], "grads": []}
    for (student, teacher, batch), idx in _ddp_steps():
        student = {k: v[rows].detach().requires_grad_(True) for k, v in student.items()}
        teacher = {k: v[rows] for k, v in teacher.items()}
        batch = Batch(target=batch.target[rows], index=batch.index[rows], epoch=0)
        m.contrast_indices = lambda index, idx=idx: idx[rows]
        m.zero_grad()
        loss, _ = m(student, teacher, batch)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in m.named_parameters()}
        if world > 1:
            for g in grads.values():
                dist.all_reduce(g)
                g /= world
            dist.all_reduce(loss := loss.detach().clone())
            loss /= world
        out["loss"].append(loss.detach())
        out["grads"].append(grads)
    out.update(memory_s=m.memory_s, memory_t=m.memory_t, z=m.z)
    return out


def _ddp_worker(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    half = DDP_B // 2
    torch.save(_run_steps(slice(rank * half, (rank + 1) * half), 2), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_processes_keep_identical_banks_equal_to_one_process(tmp_path):
    """Each rank holds half the batch (the second step repeats index 8 across the ranks): after two
    steps both ranks' banks are identical and equal one process's over the whole batch, and so are Z,
    the loss (averaged) and the heads' gradients (averaged, as DDP does)."""
    torch.multiprocessing.spawn(_ddp_worker, nprocs=2, join=True, args=(str(tmp_path / "init"), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = _run_steps(slice(None), 1)
    for name in ("memory_s", "memory_t", "z"):
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], single[name], atol=1e-6, rtol=1e-6)
    for step in range(2):
        torch.testing.assert_close(ranks[0]["loss"][step], single["loss"][step], atol=1e-5, rtol=1e-5)
        for name, g in single["grads"][step].items():
            torch.testing.assert_close(ranks[0]["grads"][step][name], g, atol=1e-5, rtol=1e-5, msg=name)
