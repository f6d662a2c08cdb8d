"""Triton kernels of kcd_fast, installed as the subpackage ``kcd_fast.kernels``.

Importing this package needs triton; :mod:`kcd_fast.ops` imports it lazily,
only when a CUDA tensor reaches an op that runs here.
"""
