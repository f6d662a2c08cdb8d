"""Triton kernels of kcd_fast, installed as the subpackage ``kcd_fast.kernels``.

Importing this package needs triton; :mod:`kcd_fast.ops` imports it lazily,
only when a CUDA tensor reaches an op that runs here. Under ``TRITON_INTERPRET=1``
(the tests on a machine without a GPU) importing it first checks that Triton's
interpreter can run these kernels (:func:`check_interpreter`).
"""
import os

import torch
import triton
import triton.language as tl


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): triton.next_power_of_2 for the host side, where
    that function's constexpr wrapper costs microseconds a call on every launch."""
    return 1 << max(int(n) - 1, 0).bit_length()


@triton.jit
def _loop_to_argument(out_ptr, n):
    """Count to the kernel argument ``n`` into out_ptr[0] (int32): the loop that the chunked kernels
    here run over a row's classes and a batch's indices."""
    count = tl.zeros((), tl.int32)
    for _ in range(0, n):
        count += 1
    tl.store(out_ptr, count)


def check_interpreter(probe=_loop_to_argument) -> None:
    """Raise a RuntimeError that says what to install if Triton's interpreter cannot run a loop to a
    kernel argument, instead of a TypeError from deep inside the first chunked kernel.

    Triton 3.6's interpreter (the one torch 2.11 brings) holds a scalar argument as a 1-element array,
    and ``range`` converts it with ``int()``, which NumPy 2.4 refuses for arrays that are not 0-d.
    Newer interpreters squeeze it first. ``probe`` is the kernel run (a parameter for the tests)."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        probe[(1,)](out, 3)
    except Exception as e:  # the interpreter wraps what the kernel raised in its own error type
        if "0-dimensional arrays" not in str(e):
            raise
        import numpy
        raise RuntimeError(
            f"kcd_fast.kernels: Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot loop to "
            f"a kernel argument with NumPy {numpy.__version__}: it converts a 1-element array with int(), which "
            f"NumPy 2.4 refuses. Install 'numpy<2.4', or a Triton whose interpreter squeezes it (3.8 does).") from e
    if int(out[0]) != 3:
        raise RuntimeError(f"kcd_fast.kernels: Triton {triton.__version__}'s interpreter counted to "
                           f"{int(out[0])} in a loop to 3; its results cannot be trusted here")


if os.environ.get("TRITON_INTERPRET") == "1":
    check_interpreter()
