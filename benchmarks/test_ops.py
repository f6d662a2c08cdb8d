"""Each op against the alternatives (see benchmarks/baselines.py): wall time with launch, and on CUDA
device time by CUDA-graph replay.

Group names are the rows of the report (benchmarks/report.py); the
``provider`` parameter is its columns.
"""
import pytest
import torch

from kcd_fast import ops
from benchmarks import baselines
from benchmarks.conftest import ON_GPU, capture_graph, sync

PROVIDERS_UPDATE = ["kcd_fast", "eager", "official"]


def _state(n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = (torch.rand(n, generator=g) * 4).to(device)
    counts = torch.randint(1, 15, (n,), generator=g, dtype=torch.int32).to(device)
    return values, counts


def _vaks_pairs(n, pairs, device):
    """VAKS pairs over n rows: distinct K1L rows, distinct K0 partners disjoint from them, eps in [0, 0.3)."""
    perm = torch.randperm(n, device=device)
    return perm[:pairs], perm[pairs: 2 * pairs], torch.rand(pairs, device=device) * 0.3


def _time_replays(benchmark, graph):
    """Time replays of a captured graph, waiting for the GPU inside each timed call."""
    def replay():
        graph.replay()
        sync()

    benchmark(replay)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", PROVIDERS_UPDATE)
def test_update_values(benchmark, run, sizes, device, provider, dtype):
    """Per-step recording of a [B, C] batch into N values (Eq. 7 + 12), wall time with launch."""
    benchmark.group = f"update_values B={sizes['B']} C={sizes['C']} {str(dtype)[6:]}"
    values, counts = _state(sizes["N"], device)
    idx = torch.randperm(sizes["N"], device=device)[: sizes["B"]]
    logits = torch.randn(sizes["B"], sizes["C"], device=device).to(dtype)
    if provider == "kcd_fast":
        fn = lambda: ops.update_values(values, counts, idx, logits)  # noqa: E731
    elif provider == "eager":
        fn = lambda: baselines.eager_update_values(values, counts, idx, logits)  # noqa: E731
    else:
        rec = baselines.OfficialRecorder(sizes["N"])
        fn = lambda: rec.observe(idx, logits)  # noqa: E731
    run(fn, provider=provider, op="update_values", **{k: sizes[k] for k in ("B", "C", "N")})


@pytest.mark.skipif(not ON_GPU, reason="CUDA-graph replay needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", ["kcd_fast", "eager"])
def test_update_values_device_time(benchmark, sizes, device, provider, dtype):
    """Device time of update_values: 100 calls captured in one CUDA graph, replayed (launch cost excluded)."""
    benchmark.group = f"update_values device time B={sizes['B']} C={sizes['C']} {str(dtype)[6:]}"
    values, counts = _state(sizes["N"], device)
    idx = torch.randperm(sizes["N"], device=device)[: sizes["B"]]
    logits = torch.randn(sizes["B"], sizes["C"], device=device).to(dtype)
    fn = ops.update_values if provider == "kcd_fast" else baselines.eager_update_values
    calls = 100
    graph = capture_graph(lambda: fn(values, counts, idx, logits), calls)
    benchmark.extra_info.update(provider=provider, op="update_values_graph", calls_per_round=calls,
                                device=torch.cuda.get_device_name(), B=sizes["B"], C=sizes["C"])
    if provider == "kcd_fast":  # the launch the default makes, so that the JSON says what was timed
        from kcd_fast.kernels.update_values import launch_config

        config = launch_config(logits)
        benchmark.extra_info.update(one_tile=config["TILE"] > 0, num_warps=config["num_warps"],
                                    row_vector_width=config["VEC"])
    _time_replays(benchmark, graph)


@pytest.mark.parametrize("provider", ["kcd_fast", "eager", "official"])
def test_estep(benchmark, run, sizes, device, provider):
    """The whole E-step over N points: score, rank, partition, pairs, keep mask."""
    n = sizes["N"]
    benchmark.group = f"E-step N={n}"
    values, counts = _state(n, device)
    prev = torch.ones(n, dtype=torch.bool, device=device)
    prev[torch.randperm(n, device=device)[: n // 20]] = False
    n_keep = int(0.8 * n)
    if provider == "kcd_fast":
        fn = lambda: ops.condense(values, counts, keep=n_keep, alpha=0.03, eps_max=0.3,  # noqa: E731
                                  previous_keep=prev)
    elif provider == "eager":
        fn = lambda: baselines.eager_condense(values, counts, n_keep, 0.03, 0.3, prev)  # noqa: E731
    else:
        record = baselines.official_record(values, counts, sizes["EPOCHS"])  # the same V and F
        fn = lambda: baselines.official_estep(record, n_keep, int(prev.sum()))  # noqa: E731
    run(fn, provider=provider, op="estep", N=n)


@pytest.mark.parametrize("provider", ["kcd_fast", "eager", "official"])
def test_rank(benchmark, run, sizes, device, provider):
    """The global sort alone (Eq. 13)."""
    n = sizes["N"]
    benchmark.group = f"rank N={n}"
    values, counts = _state(n, device)
    if provider == "kcd_fast":
        fn = lambda: ops.rank(values, counts, 0.03)  # noqa: E731
    elif provider == "eager":
        fn = lambda: torch.argsort(values.double() * counts.double().pow(0.03), descending=True,  # noqa: E731
                                   stable=True)
    else:
        scores = (values.double() * counts.double().pow(0.03)).cpu().numpy()
        fn = lambda: scores.argsort()[::-1]  # noqa: E731
    run(fn, provider=provider, op="rank", N=n)


@pytest.mark.parametrize("provider", ["kcd_fast", "eager", "official"])
def test_vaks_mix(benchmark, run, sizes, device, provider):
    """VAKS mixing of P pairs of fp16 rows (Eq. 14). Effective bytes: two rows read, one written per pair."""
    pairs = sizes["OFFICIAL_PAIRS"] if provider == "official" else sizes["PAIRS"]
    row = sizes["ROW"]
    benchmark.group = f"vaks_mix_ {row}-wide fp16 rows"
    n = 3 * pairs
    buf = torch.rand(n, row, device=device).half()
    dst, src, eps = _vaks_pairs(n, pairs, device)
    fn = {"kcd_fast": ops.vaks_mix_, "eager": baselines.eager_vaks_mix_,
          "official": baselines.official_vaks_mix_}[provider]
    run(fn, buf, dst, src, eps, provider=provider, op="vaks_mix_", pairs=pairs, row=row,
        bytes=3 * pairs * row * buf.element_size())


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_knowledge_buffer_vaks(benchmark, run, sizes, device, storage):
    """VAKS inside the cached-knowledge buffer (KnowledgeBuffer.mix_): the ImageNet-sized buffer
    (1,281,167 x 1000 fp16 dense, 2.56 GB, or top-10) with 74,000 pairs on CUDA; on the CPU,
    50,000 x 100 with 2,000 pairs. Bound (dense, CUDA; docs/performance.md): >= 2.5 TB/s effective,
    two rows read and one written per pair."""
    from kcd_fast.knowledge import KnowledgeBuffer

    n, c, pairs = sizes["N"], sizes["C"], sizes["PAIRS"]
    benchmark.group = f"KnowledgeBuffer.mix_ {n}x{c} fp16 {storage}, {pairs} pairs"
    buf = KnowledgeBuffer(n, c, storage=storage, k=10, dtype=torch.float16, device=device)
    if storage == "dense":
        buf.probs.fill_(1.0 / c)
        row_bytes = c * 2
    else:
        buf.values.fill_(0.05)
        buf.classes.copy_(torch.arange(10, dtype=torch.int32, device=device).expand(n, 10))
        row_bytes = 10 * (2 + 4)
    buf.filled.fill_(True)  # as after the first epoch: mix_ refuses unfilled rows (CPU, debug mode)
    k1l, k0, eps = _vaks_pairs(n, pairs, device)
    run(buf.mix_, k1l, k0, eps, provider="kcd_fast", op="knowledge_mix", storage=storage, N=n, pairs=pairs,
        bytes=3 * pairs * row_bytes)


@pytest.mark.skipif(not ON_GPU, reason="CUDA-graph replay needs a GPU")
@pytest.mark.parametrize("case", ["vaks_mix_", "KnowledgeBuffer.mix_"])
def test_vaks_device_time(benchmark, sizes, device, case):
    """Device time of the VAKS mix (``vaks_mix_``, and cached knowledge's in-buffer VAKS): ``calls`` calls
    captured in one CUDA graph and replayed, so the host's argument checks and the launch are excluded.
    The same shapes and effective bytes (two rows read, one written per pair) as the wall-time cases
    above, which also pay the host side once per call. Replaying mixes the same pairs again: the
    mix is convex, so the rows stay in range."""
    from kcd_fast.knowledge import KnowledgeBuffer

    pairs, row = sizes["PAIRS"], sizes["ROW"]
    if case == "vaks_mix_":
        n = 3 * pairs
        rows = torch.rand(n, row, device=device).half()
        fn = lambda: ops.vaks_mix_(rows, dst, src, eps)  # noqa: E731
    else:
        n = sizes["N"]
        buf = KnowledgeBuffer(n, row, storage="dense", dtype=torch.float16, device=device)
        buf.probs.fill_(1.0 / row)
        buf.filled.fill_(True)
        fn = lambda: buf.mix_(dst, src, eps)  # noqa: E731
    benchmark.group = f"{case} device time, {n}x{row} fp16, {pairs} pairs"
    dst, src, eps = _vaks_pairs(n, pairs, device)
    calls = 20
    graph = capture_graph(fn, calls)
    benchmark.extra_info.update(provider="kcd_fast", op="vaks_mix_graph", case=case, calls_per_round=calls,
                                device=torch.cuda.get_device_name(), N=n, pairs=pairs, row=row,
                                bytes=3 * pairs * row * 2)
    _time_replays(benchmark, graph)


@pytest.mark.skipif(not ON_GPU, reason="the fused KD loss runs on CUDA (on the CPU, kd_loss is the eager one)")
@pytest.mark.parametrize("provider", ["kcd_fast", "kcd_fast_buffer", "eager", "eager_buffer"])
def test_kd_loss(benchmark, run, sizes, device, provider):
    """The trainer's ``kd`` loss (0.1 CE + 0.9 T^2 KL(p_T || p_S) at T = 4, Eq. 1), forward and backward,
    on bf16 [B, C] logits (the trainer's under autocast): the teacher's logits (``kcd_fast``: one fused
    kernel; ``eager``: its eager twin), or the rows of a dense fp16 knowledge buffer of N samples
    (``kcd_fast_buffer``: the kernel reads them in place; ``eager_buffer``: ``teacher_logits`` and the
    eager loss)."""
    from types import SimpleNamespace

    from kcd_fast.distill import kd_loss, kd_loss_from_knowledge, kd_loss_torch
    from kcd_fast.knowledge import KnowledgeBuffer

    benchmark.group = f"KD loss forward + backward B={sizes['B']} C={sizes['C']} bfloat16"
    cfg = SimpleNamespace(kd_temperature=4.0, ce_weight=0.1, kd_weight=0.9)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(sizes["B"], sizes["C"], generator=g) * 3).to(device, torch.bfloat16).requires_grad_(True)
    t = (torch.randn(sizes["B"], sizes["C"], generator=g) * 3).to(device, torch.bfloat16)
    y = torch.randint(0, sizes["C"], (sizes["B"],), generator=g).to(device)
    idx = torch.randperm(sizes["N"], device=device)[: sizes["B"]]
    if provider.endswith("buffer"):
        kb = KnowledgeBuffer(sizes["N"], sizes["C"], dtype=torch.float16, temperature=4.0, device=device)
        kb.write(idx, t)
    loss = {"kcd_fast": lambda: kd_loss(s, t, y, cfg, 0), "eager": lambda: kd_loss_torch(s, t, y, cfg, 0),
            "kcd_fast_buffer": lambda: kd_loss_from_knowledge(s, kb, idx, y, cfg, 0),
            "eager_buffer": lambda: kd_loss_torch(s, kb.teacher_logits(idx), y, cfg, 0)}[provider]

    def step():
        s.grad = None
        loss().backward()

    run(step, provider=provider, op="kd_loss", B=sizes["B"], C=sizes["C"])
