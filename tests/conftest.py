"""Test configuration.

Without a GPU, the Triton kernels run on the CPU through Triton's interpreter:
TRITON_INTERPRET must be set before triton is first imported, so it is set
here, before any test module imports kcd_fast.kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_sessionstart():
    """Under the interpreter, stop at once with one clear message if it cannot run the kernels
    (kcd_fast.kernels.check_interpreter), rather than fail every Triton test with a TypeError."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            import kcd_fast.kernels  # noqa: F401  (checks the interpreter when first imported)
        except RuntimeError as e:
            pytest.exit(str(e), returncode=1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; on a GPU machine, bash benchmarks/gpu_check.sh runs it "
                                   "(see docs/development.md)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
