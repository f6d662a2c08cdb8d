"""The build: the compiled library, its registration, the layout, and life without it."""
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kcd_fast
from kcd_fast import extension

ROOT = Path(__file__).resolve().parents[1]


def test_extension_is_built_and_registered():
    assert extension.available(), f"kcd_fast._C did not import: {extension.LOAD_ERROR}"
    for op in ("rank", "vaks_mix_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"kcd_fast::{op}", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("kcd_fast::update_values", "CPU")
    # The CUDA kernel of update_values is the Triton kernel, registered from Python.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("kcd_fast::update_values", "CUDA")


@pytest.mark.skipif(os.environ.get("KCD_FAST_EXPECT_CUDA") != "1", reason="set KCD_FAST_EXPECT_CUDA=1 when the "
                    "build must contain the CUDA kernels (CI does)")
def test_cuda_kernels_are_built():
    assert extension.has_cuda_kernels(), "kcd_fast._C was built without its CUDA kernels"
    for op in ("rank", "vaks_mix_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"kcd_fast::{op}", "CUDA")


def test_kernels_is_a_subpackage_not_a_top_level_module(tmp_path):
    spec = importlib.util.find_spec("kcd_fast.kernels.update_values")
    assert spec is not None and Path(spec.origin).parent == ROOT / "kernels"
    code = "import importlib.util, sys; s = importlib.util.find_spec('kernels'); print(s.origin if s else None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    origin = out.stdout.strip()
    assert origin == "None" or str(ROOT) not in origin, f"a top-level 'kernels' from this project is importable: {origin}"


def test_import_without_compiled_library_raises_helpful_error(tmp_path):
    code = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "kcd_fast._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch, kcd_fast
        from kcd_fast.extension import ExtensionNotBuiltError
        v, f = torch.zeros(4), torch.zeros(4, dtype=torch.int32)
        for call in (lambda: kcd_fast.update_values(v, f, torch.tensor([1]), torch.randn(1, 3)),
                     lambda: kcd_fast.rank(v, f, 0.03),
                     lambda: kcd_fast.vaks_mix_(torch.zeros(4, 2), torch.tensor([0]), torch.tensor([1]), 0.1),
                     lambda: kcd_fast.condense(v, f, keep=2, alpha=0.03, eps_max=0.3)):
            try:
                call()
            except ExtensionNotBuiltError as e:
                assert "pip install --no-build-isolation -e ." in str(e), e
            else:
                raise AssertionError("no error")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_compiled_ops_under_torch_compile():
    values = torch.rand(100)
    counts = torch.randint(0, 4, (100,), dtype=torch.int32)
    buf = torch.rand(100, 8)
    ref_buf = buf.clone()
    dst, src, eps = torch.arange(5), torch.arange(50, 55), torch.full((5,), 0.2)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(v, c, b):
        order = torch.ops.kcd_fast.rank(v, c, 0.03)
        torch.ops.kcd_fast.vaks_mix_(b, dst, src, eps)
        return order

    order = f(values, counts, buf)
    assert torch.equal(order, kcd_fast.rank(values, counts, 0.03))
    kcd_fast.vaks_mix_(ref_buf, dst, src, eps)
    torch.testing.assert_close(buf, ref_buf)
    torch.library.opcheck(torch.ops.kcd_fast.rank.default, (values, counts, 0.03))
    torch.library.opcheck(torch.ops.kcd_fast.vaks_mix_.default, (buf.clone(), dst, src, eps))
    torch.library.opcheck(torch.ops.kcd_fast.update_values.default,
                          (values.clone(), counts.clone(), torch.tensor([1, 5, 1]), torch.randn(3, 7), 1.0))


def test_cpp_guards_raise_python_errors_in_a_subprocess():
    """The C++ guards behind the Python checks raise ValueError/RuntimeError, never crash.

    Run in a child process so that a crash in the C++ exception path fails this test with the
    child's output instead of ending the whole test run.
    """
    code = textwrap.dedent("""
        import torch, kcd_fast._C  # noqa: F401
        v, f = torch.zeros(10), torch.zeros(10, dtype=torch.int32)
        for call in (lambda: torch.ops.kcd_fast.update_values(v, f, torch.tensor([10]), torch.randn(1, 4), 1.0),
                     lambda: torch.ops.kcd_fast.rank(v, f.long(), 0.0)):
            try:
                call()
            except (ValueError, RuntimeError):
                pass
            else:
                raise AssertionError("no error")
        assert int(f.sum()) == 0
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stdout, out.stderr[-3000:])


def test_direct_topk_k_above_64_is_refused():
    with pytest.raises(RuntimeError, match="k must lie"):
        torch.ops.kcd_fast.vaks_mix_topk_(torch.rand(4, 65), torch.zeros(4, 65, dtype=torch.int32),
                                          torch.tensor([0]), torch.tensor([1]), torch.tensor([0.5]), 100)


def test_direct_op_calls_are_guarded():
    with pytest.raises(RuntimeError, match="same size"):
        torch.ops.kcd_fast.vaks_mix_(torch.rand(4, 3), torch.tensor([0]), torch.tensor([2]), torch.tensor([0.5, 0.5]))
    with pytest.raises(RuntimeError, match="same size"):
        torch.ops.kcd_fast.rank(torch.rand(5), torch.zeros(10, dtype=torch.int32), 0.0)
    with pytest.raises(RuntimeError, match=r"logits must be \[B, C\]"):
        torch.ops.kcd_fast.update_values(torch.zeros(10), torch.zeros(10, dtype=torch.int32), torch.tensor([1, 2]),
                                         torch.randn(1, 4), 1.0)
