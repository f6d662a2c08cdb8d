"""kcd_fast.ops.update_values (CPU path) and the Triton kernel (interpreter) against the float64 reference."""
import math

import pytest
import torch

import kcd_fast
from kcd_fast import reference as R
from kcd_fast.ops import update_values
from helpers import TRITON_DEVICE, assert_unchanged, compiled_in_subprocess, make_indices, make_logits, make_state, on_triton_device, snapshot

TOLS = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-5)}


def expected(values, counts, indices, logits, temperature):
    """Reference entropies and state. Low-precision logits are compared on their exact values."""
    ent = R.entropy(logits.float(), temperature)
    v, f = R.record_values(values, counts, indices, ent)
    return ent, v, f


def check(values, counts, indices, logits, temperature, fn):
    ent_ref, v_ref, f_ref = expected(values, counts, indices, logits, temperature)
    v, f = values.clone(), counts.clone()
    ent = fn(v, f, indices, logits, temperature)
    assert ent.dtype == torch.float32 and ent.shape == (logits.shape[0],)
    assert torch.equal(torch.isnan(ent), torch.isnan(ent_ref))
    atol, rtol = TOLS[logits.dtype]
    torch.testing.assert_close(ent.double().nan_to_num(), ent_ref.nan_to_num(), atol=atol, rtol=rtol)
    assert torch.equal(f.long(), f_ref), "counts differ from Eq. 12's F"
    torch.testing.assert_close(v.double(), v_ref, atol=1e-5, rtol=1e-5)
    return ent


def ops_fn(v, f, idx, x, t):
    return update_values(v, f, idx, x, temperature=t)


def triton_fn(v, f, idx, x, t, tile=None):
    """The raw Triton launcher on TRITON_DEVICE (the GPU, or the interpreter); state copied back.
    ``tile``: the kernel's path (None: its own choice, True: one tile, False: chunked)."""
    from kcd_fast.kernels.update_values import update_values_triton

    dv, df = v.to(TRITON_DEVICE), f.to(TRITON_DEVICE)
    flag = torch.zeros(1, dtype=torch.int32, device=TRITON_DEVICE)
    out = update_values_triton(dv, df, idx.to(TRITON_DEVICE), on_triton_device(x), t, flag, tile=tile)
    assert flag.item() == 0
    v.copy_(dv)
    f.copy_(df)
    return out.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,c", [(1, 1), (3, 3), (127, 1000), (64, 1001), (256, 100)])
@pytest.mark.parametrize("duplicates", [False, True])
def test_cpu_matches_reference(dtype, b, c, duplicates):
    n = 300
    values, counts = make_state(n, seed=b + c)
    idx = make_indices(b, n, seed=b, duplicates=duplicates)
    logits = make_logits(b, c, dtype=dtype, seed=c)
    check(values, counts, idx, logits, 1.0, ops_fn)


@pytest.mark.parametrize("temperature", [0.5, 4.0])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cpu_strided_temperature_int32(temperature, index_dtype):
    values, counts = make_state(50, seed=3)
    idx = make_indices(33, 50, seed=4, dtype=index_dtype)
    logits = make_logits(33, 17, seed=5, strided=True)
    check(values, counts, idx, logits, temperature, ops_fn)
    idx_strided = make_indices(66, 50, seed=6, dtype=index_dtype)[::2]
    check(values, counts, idx_strided, logits, temperature, ops_fn)


def test_non_finite_rows_are_not_recorded():
    values, counts = make_state(10, seed=0)
    idx = torch.tensor([1, 2, 2, 3, 4])
    logits = make_logits(5, 6, seed=1)
    logits[0, 1] = float("nan")
    logits[1, 0] = float("inf")
    logits[3, 5] = -float("inf")
    v, f = values.clone(), counts.clone()
    ent = update_values(v, f, idx, logits)
    assert torch.isnan(ent[[0, 1, 3]]).all() and torch.isfinite(ent[[2, 4]]).all()
    assert v[1] == values[1] and f[1] == counts[1] and v[3] == values[3] and f[3] == counts[3]
    assert f[2] == counts[2] + 1  # only the finite one of its two visits counts
    check(values, counts, idx, logits, 1.0, ops_fn)


def test_many_duplicates_of_one_sample():
    values, counts = make_state(5, seed=2)
    idx = torch.full((40,), 3)
    logits = make_logits(40, 9, seed=3)
    check(values, counts, idx, logits, 1.0, ops_fn)


def test_empty_batch():
    values, counts = make_state(5)
    before = snapshot(values, counts)
    ent = update_values(values, counts, torch.empty(0, dtype=torch.int64), torch.empty(0, 4))
    assert ent.shape == (0,)
    assert_unchanged(before, values, counts)


def test_no_autograd_graph_and_autocast():
    values, counts = make_state(20)
    w = torch.randn(8, 5, requires_grad=True)
    logits = torch.randn(3, 8) @ w
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ent = update_values(values, counts, torch.tensor([0, 1, 2]), logits)
    assert not ent.requires_grad and ent.grad_fn is None and ent.dtype == torch.float32
    assert not values.requires_grad


def test_torch_compile_custom_op():
    values, counts = make_state(30)
    idx = make_indices(12, 30, seed=9)
    logits = make_logits(12, 10, seed=9)
    ref_v, ref_f = values.clone(), counts.clone()
    ref = update_values(ref_v, ref_f, idx, logits)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(v, f, i, x):
        return kcd_fast.ops.update_values(v, f, i, x * 1.0)

    ent = step(values, counts, idx, logits)
    torch.testing.assert_close(ent, ref)
    torch.testing.assert_close(values, ref_v)
    assert torch.equal(counts, ref_f)


@pytest.mark.parametrize("c", [32_000, 128_256])
def test_cpu_long_rows_match_reference(c):
    """A language model's vocabulary: the C++ kernel's float64 sums keep it at fp32 accuracy (a sequential
    fp32 sum is 5e-5 off at 32,000 classes and 2e-4 at 128,256)."""
    logits = make_logits(2, c, seed=c) * 3
    values, counts = make_state(4)
    ent = update_values(values, counts, torch.tensor([1, 3]), logits)
    torch.testing.assert_close(ent.double(), R.entropy(logits), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_vector_path_matches_scalar_path_and_reference(dtype, monkeypatch):
    """The AVX2 row entropy (8 classes at a time, polynomial e^x) against the scalar loop
    (KCD_FAST_NO_AVX2=1) and the float64 reference: odd C around the 8- and 64-wide steps,
    logit scales from flat to peaked, non-finite rows, temperatures, duplicates."""
    g = torch.Generator().manual_seed(11)
    for c in (1, 7, 8, 9, 63, 64, 65, 100, 1001):
        scale = torch.tensor([0.01, 1.0, 3.0, 10.0, 40.0, 1.0, 1.0]).view(-1, 1)
        x = (torch.randn(7, c, generator=g) * scale).to(dtype)
        x[5, c // 2] = float("inf")
        x[6, c - 1] = float("nan")
        idx = torch.tensor([0, 1, 2, 1, 3, 4, 5])
        for t in (1.0, 4.0):
            fast_v, fast_f = make_state(6)
            slow_v, slow_f = fast_v.clone(), fast_f.clone()
            monkeypatch.delenv("KCD_FAST_NO_AVX2", raising=False)
            fast = update_values(fast_v, fast_f, idx, x, temperature=t)
            monkeypatch.setenv("KCD_FAST_NO_AVX2", "1")
            slow = update_values(slow_v, slow_f, idx, x, temperature=t)
            ref = R.entropy(x, t)
            torch.testing.assert_close(fast[:5].double(), ref[:5], atol=2e-6, rtol=1e-6)
            torch.testing.assert_close(fast, slow, atol=2e-6, rtol=1e-6, equal_nan=True)
            assert fast[5:].isnan().all()
            assert torch.equal(fast_f, slow_f)
            torch.testing.assert_close(fast_v, slow_v, atol=2e-6, rtol=1e-6)


def test_torch_compile_with_a_temperature_that_changes():
    """A trainer that anneals the temperature: Dynamo traces a changing float as a symbol, which the
    Python checks cannot read; the operator checks it instead (and a bad one still raises)."""
    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(v, f, i, x, t):
        return kcd_fast.ops.update_values(v, f, i, x, temperature=t)

    idx, logits = torch.tensor([1, 2]), make_logits(2, 7, seed=3)
    for t in (1.0, 2.0, 3.5):
        values, counts = make_state(5)
        ref_v, ref_f = values.clone(), counts.clone()
        ref = update_values(ref_v, ref_f, idx, logits, temperature=t)
        torch.testing.assert_close(step(values, counts, idx, logits, t), ref)
        torch.testing.assert_close(values, ref_v)
    values, counts = make_state(5)
    before = snapshot(values, counts)
    with pytest.raises(Exception, match="temperature"):
        step(values, counts, idx, logits, -1.0)
    assert_unchanged(before, values, counts)


def test_values_are_in_place_state_for_autograd():
    """update_values bumps the version counters as torch's in-place ops do, so a graph that saved the old
    values refuses to backpropagate; values that require grad are refused, untouched."""
    values, counts = make_state(10)
    w = torch.randn(10, requires_grad=True)
    y = (w * values).sum()
    update_values(values, counts, torch.tensor([1]), torch.randn(1, 4))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    leaf = torch.zeros(10, requires_grad=True)
    before = snapshot(leaf.detach(), counts)
    with pytest.raises(ValueError, match="`values` and `counts` must not require grad"):
        update_values(leaf, counts, torch.tensor([1]), torch.randn(1, 4))
    assert_unchanged(before, leaf.detach(), counts)


def test_the_operator_called_directly_guards_its_kernel():
    """torch.ops.kcd_fast.update_values without the Python checks: no write outside counts, no float index."""
    big = torch.zeros(10, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="values and counts must be 1-D of the same size"):
        torch.ops.kcd_fast.update_values(torch.zeros(10), big[:5], torch.tensor([7]), torch.randn(1, 4), 1.0)
    with pytest.raises(RuntimeError, match="indices must be int32 or int64"):
        torch.ops.kcd_fast.update_values(torch.zeros(10), big, torch.tensor([2.9]), torch.randn(1, 4), 1.0)
    for t in (0.0, -2.0, math.nan, 1e-39):
        with pytest.raises(ValueError, match="temperature"):
            torch.ops.kcd_fast.update_values(torch.zeros(10), big, torch.tensor([2]), torch.randn(1, 4), t)
    assert big.sum() == 0


def test_first_call_inside_a_graph_capture_is_refused(monkeypatch):
    """The error flag is made outside any capture (inside, each replay would zero it again)."""
    from kcd_fast import ops

    monkeypatch.setattr(ops, "_error_flags", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="once outside CUDA-graph capture first"):
        ops._error_flag(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    flag = ops._error_flag(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert ops._error_flag(torch.device("cpu")) is flag, "made once, then reused inside captures"


# --------------------------------------------------------------------------- bad input: clear errors, state untouched

def _bad_cases():
    v, f = make_state(10)
    idx = torch.tensor([0, 1, 2])
    x = torch.randn(3, 4)
    ok = dict(values=v, counts=f, indices=idx, logits=x)
    yield "values dtype", {**ok, "values": v.double()}, TypeError, "values.*float32"
    yield "counts dtype", {**ok, "counts": f.long()}, TypeError, "counts.*int32"
    yield "counts shape", {**ok, "counts": f[:5].clone()}, ValueError, "counts.*shape"
    yield "values 2-D", {**ok, "values": v.view(2, 5)}, ValueError, "values.*1-D"
    yield "values not a tensor", {**ok, "values": [0.0] * 10}, TypeError, "values.*torch.Tensor"
    yield "indices dtype", {**ok, "indices": idx.float()}, TypeError, "indices.*int32 or int64"
    yield "indices range high", {**ok, "indices": torch.tensor([0, 1, 10])}, ValueError, r"indices.*\[0, 10\).*10"
    yield "indices range low", {**ok, "indices": torch.tensor([0, -1, 2])}, ValueError, r"indices.*\[0, 10\).*-1"
    yield "logits dtype", {**ok, "logits": x.double()}, TypeError, "logits.*float32 or float16 or bfloat16"
    yield "logits rows", {**ok, "logits": torch.randn(4, 4)}, ValueError, "logits.*one row per index"
    yield "logits 1-D", {**ok, "logits": torch.randn(3)}, ValueError, "logits.*2-D"
    yield "logits no class", {**ok, "logits": torch.randn(3, 0)}, ValueError, "logits.*at least one class"
    yield "values strided", {**ok, "values": torch.zeros(20)[::2], "counts": torch.zeros(10, dtype=torch.int32)}, \
        ValueError, "contiguous"


@pytest.mark.parametrize("name,kwargs,exc,match", list(_bad_cases()), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_and_leaves_state(name, kwargs, exc, match):
    before = snapshot(kwargs["values"], kwargs["counts"]) if isinstance(kwargs["values"], torch.Tensor) else None
    with pytest.raises(exc, match=match):
        update_values(**kwargs)
    if before is not None:
        assert_unchanged(before, kwargs["values"], kwargs["counts"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("t", [0.0, -1.0, math.inf, math.nan, "1", 1e-39])
def test_bad_temperature(t, device):
    v, f = make_state(4, device=device)
    before = snapshot(v, f)
    with pytest.raises((ValueError, TypeError), match="temperature"):
        update_values(v, f, torch.tensor([0], device=device), torch.randn(1, 3, device=device), temperature=t)
    assert_unchanged(before, v, f)


def test_the_python_temperature_check_guards_the_triton_path():
    """On the CPU the C++ op refuses a temperature whose inverse overflows float32 too; on CUDA the Python
    check is the only guard before the Triton kernel, so it is tested on its own."""
    from kcd_fast.checks import check_temperature

    assert check_temperature("update_values", 2.95e-39) == 2.95e-39
    for t in (1e-39, 2.9e-39):
        with pytest.raises(ValueError, match="update_values: `temperature` must be at least 2.93874e-39"):
            check_temperature("update_values", t)


def test_device_mismatch_message():
    v, f = make_state(4)
    meta = torch.empty(1, 3, device="meta")
    with pytest.raises(ValueError, match="logits.*meta.*values.*cpu"):
        update_values(v, f, torch.tensor([0]), meta)


# --------------------------------------------------------------------------- the Triton kernel, interpreted on the CPU

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,c", [(1, 1), (3, 3), (6, 1000), (7, 1001), (5, 5000)])
def test_triton_kernel_matches_reference(dtype, b, c):
    n = 40
    values, counts = make_state(n, seed=c)
    idx = make_indices(b, n, seed=b)
    logits = make_logits(b, c, dtype=dtype, seed=b * c)
    check(values, counts, idx, logits, 1.0, triton_fn)


# Both paths on shapes that fit one tile, where tile=False forces the chunked one. The interpreter
# runs the one tile's multi-operand reductions slowly, so the shapes are small here;
# tests/test_cuda.py checks both paths at B = 256, C = 1000 on the GPU.
PATHS = pytest.mark.parametrize("tile", [True, False], ids=["one_tile", "chunked"])


@PATHS
@pytest.mark.parametrize("dtype,b,c", [(torch.float32, 1, 1), (torch.bfloat16, 3, 3), (torch.float16, 6, 40),
                                       (torch.float32, 20, 9), (torch.bfloat16, 5, 1000)])
def test_triton_kernel_paths_match_reference(tile, dtype, b, c):
    n = 40
    values, counts = make_state(n, seed=c)
    idx = make_indices(b, n, seed=b)
    logits = make_logits(b, c, dtype=dtype, seed=b * c)
    check(values, counts, idx, logits, 1.0, lambda *a: triton_fn(*a, tile=tile))


@PATHS
def test_triton_kernel_duplicates_strided_nonfinite_temperature(tile):
    n = 12
    values, counts = make_state(n, seed=5)
    idx = torch.tensor([4, 7, 4, 4, 1, 7, 11, 4, 0], dtype=torch.int32)
    logits = make_logits(9, 37, seed=6, strided=True, dtype=torch.bfloat16)
    logits[2, 3] = float("inf")   # a duplicate visit with a non-finite row
    logits[6, 0] = float("nan")   # a single visit with a non-finite row
    logits[7, 36] = -float("inf")  # the last class of a duplicate's row
    ent = check(values, counts, idx, logits, 2.0, lambda *a: triton_fn(*a, tile=tile))
    assert torch.isnan(ent[[2, 6, 7]]).all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("tile,c", [(False, 8192), (True, 100)], ids=["chunked", "one_tile"])
def test_triton_kernel_one_huge_logit_is_a_one_hot_row_not_nan(tile, c):
    """A finite logit far above the rest gives the entropy 0 and records the visit, as the reference
    and the CPU kernel do. On the chunked path it lies past the first 4096-wide chunk, so the running
    sums are rescaled by e^(m - m') = 0, where 0 * -inf must not turn them NaN; in one tile every
    other class's p * (z - m) is 0 * -1e37."""
    x = torch.zeros(2, c)
    x[0, c * 5 // 8] = 1e35 if c > 4096 else 1e37
    x[1, 3] = 50.0
    values, counts = make_state(4, seed=2)
    ent = check(values, counts, torch.tensor([1, 2]), x, 1.0, lambda *a: triton_fn(*a, tile=tile))
    assert ent[0] == 0.0


@pytest.mark.slow
def test_triton_kernel_batch_beyond_one_tile():
    """B > 1024: the chunked path, whose ownership counts and duplicate scan cross the 1024-wide
    chunks of indices (owners in the first chunk with duplicates in the second, and an owner and its
    duplicate both in the second)."""
    from kcd_fast.kernels.update_values import launch_config

    b, n = 1030, 2000
    values, counts = make_state(n, seed=11)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(12))[:b]
    idx[1025] = idx[3]             # owner in chunk 0, one duplicate in chunk 1
    idx[1029] = idx[1000]          # owner at the end of chunk 0
    idx[1027] = idx[1000]          # two duplicates in chunk 1
    idx[1024] = idx[1026]          # owner and duplicate both in chunk 1
    logits = make_logits(b, 5, seed=13)
    logits[1027, 2] = float("nan")  # one of the duplicates is not a number: not recorded
    assert launch_config(logits)["TILE"] == 0
    ent = check(values, counts, idx, logits, 1.0, triton_fn)
    assert torch.isnan(ent[1027]) and torch.isfinite(ent[[3, 1000, 1024, 1025, 1026, 1029]]).all()


def test_triton_kernel_path_choice_and_arguments():
    """One tile where the row and up to 1024 indices fit, else chunked; ``tile=True`` on a shape
    without one tile is a clear error, with no launch."""
    from kcd_fast.kernels.update_values import launch_config, one_tile, update_values_triton

    # The tile holds the row and up to 1024 indices, whatever the batch (no recompile for a short one).
    assert one_tile(256, 1000) == 1024 and one_tile(256, 100) == 1024 and one_tile(3, 3) == 1024
    assert one_tile(512, 100) == 1024 and one_tile(256, 4096) == 4096 and one_tile(1024, 10) == 1024
    assert one_tile(256, 4097) == 0 and one_tile(1025, 10) == 0

    def meta(b, c):
        return torch.empty(b, c, device="meta")

    assert launch_config(meta(256, 1000))["TILE"] == 1024 and launch_config(meta(256, 4096))["TILE"] == 4096
    assert launch_config(meta(256, 32000))["TILE"] == 0 and launch_config(meta(1025, 10))["TILE"] == 0
    assert launch_config(meta(256, 1000), tile=False)["TILE"] == 0
    assert launch_config(meta(256, 1000), tile=True)["TILE"] == 1024
    assert launch_config(meta(256, 32000), tile=False)["TILE"] == 0
    values, counts = make_state(6, device=TRITON_DEVICE)
    before = snapshot(values, counts)
    flag = torch.zeros(1, dtype=torch.int32, device=TRITON_DEVICE)
    idx = torch.tensor([1, 2], device=TRITON_DEVICE)
    with pytest.raises(ValueError, match=r"tile=True needs C <= 4096 and B <= 1024.*\[2, 4097\]"):
        update_values_triton(values, counts, idx, torch.randn(2, 4097, device=TRITON_DEVICE), 1.0, flag, tile=True)
    with pytest.raises(ValueError, match=r"tile=True needs.*\[1025, 3\]"):
        launch_config(meta(1025, 3), tile=True)
    assert_unchanged(before, values, counts)
    assert flag.item() == 0


class _Probe:
    """A stand-in for the interpreter probe kernel: ``probe[(1,)](out, n)`` raises ``error`` or writes ``count``."""

    def __init__(self, error=None, count=3):
        self.error, self.count = error, count

    def __getitem__(self, grid):
        def launch(out, n):
            if self.error is not None:
                raise self.error
            out[0] = self.count
        return launch


def test_check_interpreter_names_the_numpy_that_triton_3_6_cannot_loop_with():
    """Triton 3.6's interpreter with NumPy >= 2.4 fails every loop to a kernel argument with a bare
    TypeError; importing the kernels under the interpreter says what to install instead. Other
    errors pass through unchanged, and a wrong count is refused."""
    from kcd_fast.kernels import check_interpreter

    if TRITON_DEVICE == "cpu":
        check_interpreter()  # the real probe, in the interpreter these tests run in
    cause = RuntimeError("TypeError('only 0-dimensional arrays can be converted to Python scalars')")
    with pytest.raises(RuntimeError, match=r"cannot loop to a kernel argument with NumPy .*Install 'numpy<2\.4'") as e:
        check_interpreter(_Probe(cause))
    assert e.value.__cause__ is cause
    other = ValueError("something else")
    with pytest.raises(ValueError) as e:
        check_interpreter(_Probe(other))
    assert e.value is other
    with pytest.raises(RuntimeError, match="counted to 2 in a loop to 3"):
        check_interpreter(_Probe(count=2))


def test_launch_config_follows_shape_strides_and_dtype_and_is_not_shared():
    """launch_config is cached per (shape, strides, dtype, overrides): each distinct layout still gets
    its own vector width, and a caller that edits the returned dict (codegen pops num_warps) does not
    edit the next call's."""
    import triton

    from kcd_fast.kernels import pow2_at_least
    from kcd_fast.kernels.update_values import launch_config

    for n in [*range(0, 1100), 4095, 4096, 4097, 2**20 + 3]:
        assert pow2_at_least(n) == (1 if n <= 1 else triton.next_power_of_2(n)), n
    x = torch.empty(256, 1000, device="meta")
    assert launch_config(x) == dict(BLOCK_C=1024, BLOCK_B=1024, TILE=1024, VEC=4, num_warps=4)
    # An epoch's short last batch compiles nothing new: 1,281,167 = 2502 x 512 + 143.
    for c in (100, 1000):
        full, last = launch_config(torch.empty(512, c, device="meta")), launch_config(torch.empty(143, c, device="meta"))
        assert full == last == launch_config(torch.empty(1, c, device="meta")), c
    assert launch_config(x.to(torch.bfloat16))["VEC"] == 8
    assert launch_config(torch.empty(256, 1001, device="meta")[:, :1000])["VEC"] == 1  # row stride 1001
    assert launch_config(torch.empty(1000, 256, device="meta").t())["VEC"] == 1  # class stride 256
    assert launch_config(torch.empty(256, 1002, device="meta"))["VEC"] == 2
    assert launch_config(x, vectorize=False)["VEC"] == 1
    assert launch_config(x, num_warps=2, tile=False) == dict(
        BLOCK_C=1024, BLOCK_B=1024, TILE=0, VEC=4, num_warps=2)
    launch_config(x).pop("num_warps")
    assert launch_config(x)["num_warps"] == 4


def test_triton_kernel_flags_out_of_range_without_writing():
    from kcd_fast.kernels.update_values import update_values_triton

    values, counts = make_state(6, seed=1, device=TRITON_DEVICE)
    before = snapshot(values, counts)
    flag = torch.zeros(1, dtype=torch.int32, device=TRITON_DEVICE)
    idx = torch.tensor([6, -1], device=TRITON_DEVICE)
    update_values_triton(values, counts, idx, torch.randn(2, 5, device=TRITON_DEVICE), 1.0, flag)
    assert flag.item() == 1
    assert_unchanged(before, values, counts)


def test_triton_kernel_matches_cpu_path_bitwise_counts():
    n = 25
    values, counts = make_state(n, seed=7)
    idx = make_indices(16, n, seed=8)
    logits = make_logits(16, 129, seed=9)
    v1, f1 = values.clone(), counts.clone()
    v2, f2 = values.clone(), counts.clone()
    e1 = update_values(v1, f1, idx, logits)
    e2 = triton_fn(v2, f2, idx, logits, 1.0)
    assert torch.equal(f1, f2)
    torch.testing.assert_close(e1, e2, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(v1, v2, atol=2e-6, rtol=2e-6)


# --------------------------------------------------------------------------- what the compiler makes of it (sm_90)

@pytest.mark.slow
def test_kernel_compiles_for_hopper_with_16_byte_row_loads():
    """Compiled ahead of time for sm_90 (no GPU needed; outside the interpreter, so in a subprocess):
    with the launcher's VEC promise, a [256, 1000] row is read in 16-byte loads on both paths;
    without it, element by element. Guards the vectorised loads against a change that silently
    loses them, and the one-tile path's early read of the sample's state."""
    code = ("import json, torch\n"
            "from benchmarks.codegen_update_values import compile_variant, stats\n"
            "out = {f'{str(d)[6:]}/{t}/{v}': stats(compile_variant(d, 256, 1000, num_warps=4, tile=t, vectorize=v))\n"
            "       for d in (torch.float32, torch.bfloat16) for t in (True, False) for v in (True, False)}\n"
            "print(json.dumps(out))\n")
    got = compiled_in_subprocess(code)
    for dtype in ("float32", "bfloat16"):
        for tile in (True, False):
            vec, scalar = got[f"{dtype}/{tile}/True"], got[f"{dtype}/{tile}/False"]
            assert scalar["ptx_16_byte_loads"] == 0
            # 4 warps = 128 threads over a 1024-wide block: 8 fp32 (2 loads) or 8 bf16 (1 load) each,
            # in the row's entropy and again in a duplicate's.
            assert vec["ptx_16_byte_loads"] == (4 if dtype == "float32" else 2), (dtype, tile)
            assert vec["ptx_global_loads"] < scalar["ptx_global_loads"], (dtype, tile)
        # One tile: the sample's state (F, V) is read with the row, before the reductions, not after them.
        assert got[f"{dtype}/True/True"]["ptx_b32_loads_before_first_barrier"] == 2


def test_duplicates_apply_eq12_in_batch_order_bitwise():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(4, generator=g) * 3
    counts = torch.tensor([0, 2, 5, 1], dtype=torch.int32)
    idx = torch.tensor([1, 1, 2, 1, 1, 2, 1, 0, 1, 1, 1, 1, 2, 1, 1, 1])
    logits = torch.randn(len(idx), 37, generator=g) * 3
    v, f = values.clone(), counts.clone()
    ent = update_values(v, f, idx, logits)
    ev, ef = values.clone(), counts.clone()
    for b, i in enumerate(idx.tolist()):  # one fp32 visit at a time, in batch order
        ef[i] += 1
        ev[i] = ev[i] + (ent[b] - ev[i]) / ef[i].float()
    assert torch.equal(f, ef) and torch.equal(v, ev)


def test_large_logits_at_low_temperature_do_not_overflow():
    x = torch.tensor([[100.0, 99.0, 0.0] + [0.0] * 6, [0.0] * 8 + [100.0]])  # 9 classes: tail of the AVX2 loop
    for t in (0.5, 1.0):
        ent = update_values(torch.zeros(2), torch.zeros(2, dtype=torch.int32), torch.tensor([0, 1]), x, temperature=t)
        ref = kcd_fast.reference.entropy(x, t)
        assert torch.isfinite(ent).all()
        torch.testing.assert_close(ent.double(), ref, atol=1e-6, rtol=1e-6)
