"""Loading of the compiled extension ``kcd_fast._C``.

``import kcd_fast`` works without it; every op that needs it calls
:func:`require` and gets an :class:`ExtensionNotBuiltError` that says how to
build it.
"""
from __future__ import annotations

import torch

BUILD_HINT = (
    "Build it from the repository root with `pip install --no-build-isolation -e .` "
    "(set CUDA_HOME=/usr/local/cuda for the CUDA kernels; KCD_FAST_CPU_ONLY=1 builds the CPU kernels only). "
    "See README.md, 'Install'."
)


class ExtensionNotBuiltError(RuntimeError):
    """The compiled extension kcd_fast._C (or its CUDA part) is not available."""


try:  # pragma: no branch
    import kcd_fast._C as _C  # noqa: F401  (registers torch.ops.kcd_fast.*)

    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # not built, or built for another torch
    _C = None
    LOAD_ERROR = exc


def available() -> bool:
    """True when kcd_fast._C is importable."""
    return _C is not None


def has_cuda_kernels() -> bool:
    """True when kcd_fast._C was built with its CUDA kernels."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key("kcd_fast::rank", "CUDA")


def require(op: str, device: torch.device | None = None) -> None:
    """Raise ExtensionNotBuiltError unless ``op`` can run on ``device``."""
    if _C is None:
        raise ExtensionNotBuiltError(
            f"kcd_fast.ops.{op} needs the compiled extension kcd_fast._C, which could not be imported "
            f"({LOAD_ERROR}). {BUILD_HINT}"
        )
    if device is not None and device.type == "cuda" and not has_cuda_kernels():
        raise ExtensionNotBuiltError(
            f"kcd_fast.ops.{op} got CUDA tensors, but kcd_fast._C was built without its CUDA kernels. "
            f"Rebuild with nvcc available (or FORCE_CUDA=1). {BUILD_HINT}"
        )
