"""The CUDA paths (Triton kernel, CUB rank, CUDA mix) against the reference and the CPU paths.

Skipped without a GPU; benchmarks/gpu_check.sh runs them on a GPU machine and writes its results
under benchmarks/results/.
"""
import pytest
import torch

from kcd_fast import ops, reference as R
from helpers import make_indices, make_logits, make_state

pytestmark = pytest.mark.cuda
DEV = "cuda"


# The kernel's own path choice: one tile up to C = 4096 and B = 1024, chunked beyond either.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,c", [(1, 1), (3, 3), (127, 1000), (256, 1000), (64, 1001), (8, 32000), (1030, 100)])
@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_update_values_triton(dtype, b, c, duplicates, strided):
    n = 5000
    values, counts = make_state(n, seed=b + c)
    idx = make_indices(b, n, seed=b, duplicates=duplicates)
    logits = make_logits(b, c, dtype=dtype, seed=c, strided=strided, device=DEV)
    assert not strided or logits.numel() == 1 or not logits.is_contiguous()
    if b > 2:
        logits[1, 0] = float("nan")
    ent_ref = R.entropy(logits.cpu().float(), 1.5)
    v_ref, f_ref = R.record_values(values, counts, idx, ent_ref)
    v, f = values.to(DEV), counts.to(DEV)
    ent = ops.update_values(v, f, idx.to(DEV), logits, temperature=1.5)
    assert torch.equal(torch.isnan(ent.cpu()), torch.isnan(ent_ref))
    torch.testing.assert_close(ent.cpu().double().nan_to_num(), ent_ref.nan_to_num(), atol=2e-5, rtol=2e-5)
    assert torch.equal(f.cpu().long(), f_ref)
    torch.testing.assert_close(v.cpu().double(), v_ref, atol=2e-5, rtol=2e-5)


def test_update_values_no_sync_and_cuda_graph():
    values, counts = make_state(10_000, device=DEV)
    idx = make_indices(256, 10_000, seed=1, device=DEV)
    logits = make_logits(256, 1000, dtype=torch.bfloat16, device=DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.update_values(values, counts, idx, logits)  # warm-up (compiles the kernel)
        ops.update_values(values, counts, idx, logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    v0, f0 = values.clone(), counts.clone()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ops.update_values(values, counts, idx, logits)
        with torch.cuda.graph(graph, stream=stream):
            ent = ops.update_values(values, counts, idx, logits)
    torch.cuda.synchronize()
    values.copy_(v0)
    counts.copy_(f0)
    graph.replay()
    graph.replay()
    v_ref, f_ref = v0.clone(), f0.clone()
    ops.update_values(v_ref, f_ref, idx, logits)
    ops.update_values(v_ref, f_ref, idx, logits)
    assert torch.equal(counts, f_ref)
    torch.testing.assert_close(values, v_ref)
    assert torch.isfinite(ent).all()


def test_update_values_out_of_range_flag():
    values, counts = make_state(10, device=DEV)
    before = (values.clone(), counts.clone())
    ops.update_values(values, counts, torch.tensor([3, 12], device=DEV), torch.randn(2, 4, device=DEV))
    with pytest.raises(ValueError, match="outside"):
        ops.check_errors(DEV)
    assert counts[3] == before[1][3] + 1 and torch.equal(values[:3], before[0][:3])
    ops.check_errors(DEV)  # cleared
    ops.set_debug(True)
    try:
        with pytest.raises(ValueError, match=r"indices.*\[0, 10\)"):
            ops.update_values(values, counts, torch.tensor([12], device=DEV), torch.randn(1, 4, device=DEV))
    finally:
        ops.set_debug(False)


@pytest.mark.parametrize("n", [1, 1001, 1_281_167])
@pytest.mark.parametrize("alpha", [0.0, 0.03])
def test_rank_cuda_equals_cpu(n, alpha):
    values, counts = make_state(n, seed=n, max_count=15)
    values[: n // 3] = values[n // 3: 2 * (n // 3)]  # ties
    assert torch.equal(ops.rank(values.to(DEV), counts.to(DEV), alpha).cpu(), ops.rank(values, counts, alpha))


@pytest.mark.parametrize("policy", ["dropped", "all"])
def test_condense_cuda_equals_cpu(policy):
    values, counts = make_state(100_003, seed=5)
    prev = torch.rand(100_003, generator=torch.Generator().manual_seed(2)) < 0.95
    cpu = ops.condense(values, counts, keep=0.8, alpha=0.03, eps_max=0.3, previous_keep=prev, k0=policy)
    gpu = ops.condense(values.to(DEV), counts.to(DEV), keep=0.8, alpha=0.03, eps_max=0.3,
                       previous_keep=prev.to(DEV), k0=policy)
    for name in ("keep", "order", "k1l", "k0", "eps"):
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("shape", [(1000, 1000), (999, 1001), (500, 7), (300, 3, 32, 32)])
def test_vaks_mix_cuda(dtype, shape):
    g = torch.Generator().manual_seed(0)
    buf = (torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) if dtype == torch.uint8
           else torch.rand(shape, generator=g).to(dtype))
    perm = torch.randperm(shape[0], generator=g)
    p = shape[0] // 3
    dst, src = perm[:p], perm[p:2 * p]
    eps = torch.rand(p, generator=g) * 0.3
    ref = R.vaks_mix(buf, dst, src, eps)
    cpu = ops.vaks_mix_(buf.clone(), dst, src, eps)
    gpu = ops.vaks_mix_(buf.to(DEV), dst.to(DEV), src.to(DEV), eps.to(DEV)).cpu()
    if dtype == torch.uint8:
        assert int((gpu.int() - ref.int()).abs().max()) <= 1
    else:
        torch.testing.assert_close(gpu.double(), ref.double(), atol=1e-2 if dtype == torch.bfloat16 else 1e-3,
                                   rtol=1e-2)
    assert torch.equal(gpu, cpu), "CUDA and CPU kernels must agree bit for bit (same fp32 math)"


@pytest.mark.parametrize("storage,dtype", [("dense", torch.float16), ("dense", torch.bfloat16),
                                           ("topk", torch.float16), ("topk", torch.float32)])
@pytest.mark.parametrize("c", [10, 1001])
def test_knowledge_buffer_cuda_matches_reference_and_cpu(storage, dtype, c):
    from kcd_fast.knowledge import KnowledgeBuffer

    n, k = 300, 10
    z = torch.randn(n, c, generator=torch.Generator().manual_seed(c)) * 3.0
    bufs = [KnowledgeBuffer(n, c, storage=storage, k=k, dtype=dtype, temperature=4.0, device=d) for d in ("cpu", DEV)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    for b in bufs:
        b.write(perm.to(b.device), z[perm].to(b.device))
    q = torch.tensor([7, 3, 7, 299, 0, 150])
    cpu, gpu = bufs[0].read(q), bufs[1].read(q.to(DEV)).cpu()
    if storage == "dense":
        ref = R.soft_labels(z[q], 4.0)
    else:
        v_ref, c_ref = R.topk_encode(R.soft_labels(z, 4.0), k)
        ref = R.topk_decode(v_ref[q], c_ref[q], c)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(gpu.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(gpu, cpu, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c,k", [(10, 3), (1000, 10), (20, 20)])
def test_vaks_mix_topk_cuda_equals_cpu_and_dense_reference(dtype, c, k):
    n = 3000
    z = torch.randn(n, c, generator=torch.Generator().manual_seed(3)) * 2.0
    v, cl = R.topk_encode(R.soft_labels(z, 1.0), k)
    values, classes = v.to(dtype).contiguous(), cl.int().contiguous()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(4))
    dst, src = perm[:1000], perm[1000:2000]
    eps = torch.rand(1000, generator=torch.Generator().manual_seed(5)) * 0.3
    ref_v, ref_c = R.vaks_mix_topk(values.double(), classes, dst, src, eps, c)
    cpu_v, cpu_c = values.clone(), classes.clone()
    ops.vaks_mix_topk_(cpu_v, cpu_c, dst, src, eps, c)
    gpu_v, gpu_c = values.to(DEV), classes.to(DEV)
    ops.vaks_mix_topk_(gpu_v, gpu_c, dst.to(DEV), src.to(DEV), eps.to(DEV), c)
    assert torch.equal(gpu_c.cpu(), cpu_c)
    torch.testing.assert_close(gpu_v.cpu(), cpu_v, atol=0, rtol=0)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(R.topk_decode(gpu_v.cpu(), gpu_c.cpu(), c), R.topk_decode(ref_v, ref_c, c),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("ovr", [True, False])
def test_condenser_observe_no_sync_and_matches_cpu(ovr):
    from kcd_fast import KnowledgeCondenser

    n = 10_000
    conds = [KnowledgeCondenser(n, epochs=4, stage_epochs=2, device=d, online_recording=ovr) for d in ("cpu", DEV)]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randperm(n, generator=g)[:256], torch.randn(256, 100, generator=g)) for _ in range(3)]
    if not ovr:  # the w/o OVR ablation with a sampler with replacement: duplicates, some rows not a number
        batches = [(torch.randint(0, n, (256,), generator=g), x) for _, x in batches]
        for _, x in batches:
            x[::7, 3] = float("nan")
    for idx, logits in batches:
        conds[0].observe(idx, logits)
    gpu_batches = [(i.to(DEV), x.to(DEV)) for i, x in batches]
    conds[1].observe(*gpu_batches[0])  # warm-up: compiles the kernel
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for idx, logits in gpu_batches[1:]:
            conds[1].observe(idx, logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(conds[1].counts.cpu(), conds[0].counts)
    torch.testing.assert_close(conds[1].values.cpu(), conds[0].values, atol=2e-5, rtol=2e-5)
    if not ovr:
        torch.testing.assert_close(conds[1].last_values.cpu(), conds[0].last_values, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("tile", [True, False], ids=["one_tile", "chunked"])
@pytest.mark.parametrize("num_warps", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,c", [(3, 3), (256, 1000), (64, 1001), (256, 100)])
@pytest.mark.parametrize("layout", ["contiguous", "contiguous_scalar_loads", "strided"])
def test_update_values_triton_launch_options(tile, num_warps, dtype, b, c, layout):
    """Every launch configuration that sweep_update_values.py times, against the reference: both paths
    on shapes that fit one tile, each num_warps, with and without the 16-byte row loads (a strided
    row has none to withhold)."""
    from kcd_fast.kernels.update_values import update_values_triton

    values, counts = make_state(5000, seed=b)
    idx = make_indices(b, 5000, seed=b, duplicates=True)
    logits = make_logits(b, c, dtype=dtype, seed=c, strided=layout == "strided", device=DEV)
    logits[1, 0] = float("nan")
    logits[2, c - 1] = -float("inf")
    ent_ref = R.entropy(logits.cpu().float(), 1.0)
    v_ref, f_ref = R.record_values(values, counts, idx, ent_ref)
    v, f = values.to(DEV), counts.to(DEV)
    flag = torch.zeros(1, dtype=torch.int32, device=DEV)
    ent = update_values_triton(v, f, idx.to(DEV), logits, 1.0, flag, tile=tile, num_warps=num_warps,
                               vectorize=layout != "contiguous_scalar_loads")
    assert torch.equal(torch.isnan(ent.cpu()), torch.isnan(ent_ref))
    torch.testing.assert_close(ent.cpu().double().nan_to_num(), ent_ref.nan_to_num(), atol=2e-5, rtol=2e-5)
    assert torch.equal(f.cpu().long(), f_ref)
    torch.testing.assert_close(v.cpu().double(), v_ref, atol=2e-5, rtol=2e-5)
    assert int(flag.item()) == 0


def test_direct_operator_calls_refuse_pairs_on_another_device():
    """torch.ops.kcd_fast.* called directly with host indices for a device buffer: a clear error, not a
    kernel dereferencing host pointers."""
    buf = torch.rand(8, 5, device=DEV).half()
    before = buf.clone()
    d, s, e = torch.tensor([1]), torch.tensor([2]), torch.tensor([0.5])
    with pytest.raises(RuntimeError, match="on the device of the rows they index"):
        torch.ops.kcd_fast.vaks_mix_(buf, d, s, e)
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.kcd_fast.rank(torch.rand(8, device=DEV), torch.zeros(8, dtype=torch.int32), 0.03)
    assert torch.equal(buf, before)


def test_cuda_devices_are_pinned_to_an_index():
    """"cuda" becomes cuda:<current> at construction: a later set_device cannot move the launches."""
    from kcd_fast import KnowledgeBuffer, KnowledgeCondenser

    assert KnowledgeBuffer(4, 3, device="cuda").device.index is not None
    assert KnowledgeCondenser(4, epochs=1, stage_epochs=1, device="cuda").device.index is not None
