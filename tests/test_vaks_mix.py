"""kcd_fast.ops.vaks_mix_ (C++ CPU kernel) against the reference mixing of Eq. 14."""
import pytest
import torch

from kcd_fast import reference as R
from kcd_fast.ops import vaks_mix_
from helpers import assert_unchanged, snapshot


def make_pairs(n, p, seed=0, dtype=torch.int64):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:p].to(dtype), perm[p:2 * p].to(dtype)


def make_buffer(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    x = torch.rand(shape, generator=g)
    return (x / x.sum(dim=tuple(range(1, x.dim())), keepdim=True) if x.dim() > 1 else x).to(dtype)


TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("shape,pairs", [((2,), 1), ((7, 3), 3), ((101, 1000), 50), ((64, 1001), 31),
                                          ((40, 5, 6, 3), 20)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_matches_reference(dtype, shape, pairs, index_dtype):
    buf = make_buffer(shape, dtype, seed=shape[0])
    dst, src = make_pairs(shape[0], pairs, seed=pairs, dtype=index_dtype)
    eps = torch.rand(pairs, generator=torch.Generator().manual_seed(3)) * 0.3
    ref = R.vaks_mix(buf, dst, src, eps)
    out = vaks_mix_(buf, dst, src, eps)
    assert out is buf
    if dtype == torch.uint8:
        diff = (buf.int() - ref.int()).abs()
        assert int(diff.max()) <= 1  # fp32 vs float64 at a .5 rounding boundary
        assert float((diff == 0).float().mean()) > 0.99
    else:
        torch.testing.assert_close(buf.double(), ref.double(), atol=TOL[dtype], rtol=TOL[dtype])


def test_soft_labels_stay_normalised_and_untouched_rows_stay():
    buf = make_buffer((50, 100), torch.float32, seed=1)
    orig = buf.clone()
    dst, src = make_pairs(50, 10)
    vaks_mix_(buf, dst, src, torch.linspace(0, 0.3, 10))
    torch.testing.assert_close(buf.sum(1), torch.ones(50))
    others = torch.ones(50, dtype=torch.bool)
    others[dst] = False
    assert torch.equal(buf[others], orig[others])


def test_scalar_eps_and_empty_pairs():
    buf = make_buffer((6, 4), torch.float32)
    ref = R.vaks_mix(buf, torch.tensor([0, 1]), torch.tensor([4, 5]), torch.tensor([0.25, 0.25]))
    vaks_mix_(buf, torch.tensor([0, 1]), torch.tensor([4, 5]), 0.25)
    torch.testing.assert_close(buf.double(), ref.double())
    before = buf.clone()
    vaks_mix_(buf, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), torch.empty(0))
    assert torch.equal(buf, before)


def test_bad_input_leaves_buffer():
    buf = make_buffer((10, 4), torch.float32)
    before = snapshot(buf)
    d, s, e = torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0.1, 0.2])
    cases = [
        ((buf.double(), d, s, e), TypeError, "buffer.*float32 or float16 or bfloat16 or uint8"),
        ((buf.t(), d, s, e), ValueError, "buffer.*contiguous"),
        ((buf, d.float(), s, e), TypeError, "dst.*int32 or int64"),
        ((buf, d, s[:1], e), ValueError, "src.*one index per"),
        ((buf, d, s, e[:1]), ValueError, "eps.*one value per pair"),
        ((buf, torch.tensor([0, 10]), s, e), ValueError, r"dst.*\[0, 10\)"),
        ((buf, d, torch.tensor([-1, 3]), e), ValueError, r"src.*\[0, 10\)"),
        ((buf, torch.tensor([1, 1]), s, e), ValueError, "dst.*repeat"),
        ((buf, d, torch.tensor([1, 3]), e), ValueError, "dst.*src.*share"),
        ((buf, d, s, torch.tensor([0.1, 1.5])), ValueError, r"eps.*\[0, 1\]"),
        ((buf, d, s, 2.0), ValueError, "eps"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            vaks_mix_(*args)
    assert_unchanged(before, buf)


def test_written_buffers_must_not_require_grad_and_their_versions_move():
    """Both VAKS ops write outside autograd: a buffer that requires grad is refused, unchanged (a leaf
    would be mixed where torch's own in-place ops refuse it); the version counter moves, so a graph
    that saved the buffer before the mix refuses to backpropagate instead of using the mixed rows."""
    from kcd_fast.ops import vaks_mix_topk_

    d, s, e = torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([0.2, 0.5])
    leaf = torch.rand(6, 4, requires_grad=True)
    before = leaf.detach().clone()
    with pytest.raises(ValueError, match="vaks_mix_: `buffer` must not require grad"):
        vaks_mix_(leaf, d, s, e)
    assert torch.equal(leaf.detach(), before)
    values = torch.rand(6, 2, requires_grad=True)
    classes = torch.tensor([[0, 1]] * 6, dtype=torch.int32)
    with pytest.raises(ValueError, match="vaks_mix_topk_: `values` must not require grad"):
        vaks_mix_topk_(values, classes, d, s, e, 5)

    x = torch.rand(6, 4, requires_grad=True)
    with torch.no_grad():
        y = x * 1  # a buffer made without grad, then used in a graph that saves it
    y.requires_grad_(False)
    w = torch.rand(4, requires_grad=True)
    loss = (y * w).sum()  # saves y for w's gradient
    version = y._version
    vaks_mix_(y, d, s, e)
    assert y._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    values, classes = torch.full((6, 2), 0.3), torch.tensor([[0, 1]] * 6, dtype=torch.int32)
    versions = values._version, classes._version
    vaks_mix_topk_(values, classes, d, s, e, 5)
    assert values._version > versions[0] and classes._version > versions[1]
    # No pairs, no write: the version stays.
    version = y._version
    vaks_mix_(y, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), torch.empty(0))
    assert y._version == version


@pytest.mark.parametrize("row", [1, 7, 8, 9, 100, 1001])
def test_fp16_fast_path_is_bitwise_the_scalar_twin(monkeypatch, row):
    """The F16C fp16 path (where the CPU has it) equals the scalar path and fp32 torch math, bit for bit.

    Inputs span normals, subnormals, zeros and large values; rows cover the 8-wide body and its tail.
    """
    g = torch.Generator().manual_seed(row)
    n, p = 64, 20
    mant = torch.rand(n, row, generator=g) * 2 - 1
    expo = torch.randint(-26, 16, (n, row), generator=g).float()
    buf = (mant * torch.pow(2.0, expo)).half()
    buf[0, : min(row, 3)] = torch.tensor([0.0, 6e-8, 65504.0])[: min(row, 3)].half()
    dst, src = make_pairs(n, p, seed=row)
    eps = torch.rand(p, generator=g) * 0.3
    a, b, e = buf[dst].float(), buf[src].float(), eps.view(-1, 1)
    expected = buf.clone()
    expected[dst] = ((1 - e) * a + e * b).half()  # separate fp32 products and sum, then RNE to fp16
    fast = vaks_mix_(buf.clone(), dst, src, eps)
    monkeypatch.setenv("KCD_FAST_NO_F16C", "1")
    scalar = vaks_mix_(buf.clone(), dst, src, eps)
    assert torch.equal(fast, scalar)
    assert torch.equal(fast.view(torch.int16), expected.view(torch.int16))


def test_uint8_mix_rounds_ties_to_even():
    buf = torch.tensor([[2, 3, 0, 255], [3, 2, 1, 254], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.uint8)
    vaks_mix_(buf, torch.tensor([0]), torch.tensor([1]), torch.tensor([0.5]))
    # 2.5 -> 2, 2.5 -> 2, 0.5 -> 0, 254.5 -> 254 (ties to even)
    assert buf[0].tolist() == [2, 2, 0, 254]


@pytest.mark.parametrize("bad", [("dst", 30), ("dst", -1), ("src", 20), ("src", -5)])
def test_the_raw_ops_refuse_rows_outside_the_buffer_before_writing(bad):
    # torch.ops.kcd_fast.* skip ops.py's checks (e.g. under torch.compile): their kernels check the
    # ranges themselves, so nothing outside the buffer is written, not even memory past a view's end.
    which, row = bad
    big = make_buffer((40, 3), torch.float32, seed=1)
    buf = big[:20]
    dst, src = torch.tensor([2, 3], dtype=torch.int64), torch.tensor([5, 6], dtype=torch.int64)
    (dst if which == "dst" else src)[1] = row
    before = big.clone()
    with pytest.raises(ValueError, match=rf"vaks_mix_: `{which}` must lie in \[0, 20\), found {row}"):
        torch.ops.kcd_fast.vaks_mix_(buf, dst, src, torch.full((2,), 0.5))
    assert torch.equal(big, before)
    values, classes = big[:20].contiguous(), torch.zeros(20, 3, dtype=torch.int32)
    classes[:] = torch.arange(3, dtype=torch.int32)
    v0, c0 = values.clone(), classes.clone()
    with pytest.raises(ValueError, match=rf"vaks_mix_topk_: `{which}` must lie in \[0, 20\), found {row}"):
        torch.ops.kcd_fast.vaks_mix_topk_(values, classes, dst, src, torch.full((2,), 0.5), 10)
    assert torch.equal(values, v0) and torch.equal(classes, c0)
