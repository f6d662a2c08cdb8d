"""Triton kernels of kcd_fast, installed as the subpackage ``kcd_fast.kernels``.

Importing this package needs triton; :mod:`kcd_fast.ops` imports it lazily,
only when a CUDA tensor reaches an op that runs here.
"""


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): triton.next_power_of_2 for the host side, where
    that function's constexpr wrapper costs microseconds a call on every launch."""
    return 1 << max(int(n) - 1, 0).bit_length()
