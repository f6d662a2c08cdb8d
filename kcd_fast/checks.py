"""Argument validators shared by every module of kcd_fast, and the debug-mode switch.

Each validator names the operation and the argument in its error, ``op: `name` must be ...``, and
raises ``TypeError`` for a wrong type or dtype and ``ValueError`` for a wrong shape, device, range
or value. None of them changes anything, so a refused call leaves all state as it was.

Checks of a tensor's *contents* (indices in range, ...) make the host wait for the GPU. They always
run on the CPU; on CUDA only in debug mode (:func:`set_debug`, or the environment variable
``KCD_FAST_DEBUG=1``), as :func:`checks_contents` decides.
"""
from __future__ import annotations

import math
import os
from numbers import Integral, Real

import torch

__all__ = [
    "INDEX_DTYPES", "LOGIT_DTYPES", "set_debug", "debug_enabled", "checks_contents", "check_tensor",
    "check_same_device", "check_matching", "check_index_range", "check_finite", "check_real", "check_int",
    "check_flag", "check_choice", "check_temperature", "check_vaks_pairs", "check_plan_pairs",
]

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
_EPS_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)

_debug = os.environ.get("KCD_FAST_DEBUG", "0").lower() in ("1", "true", "yes", "on")


def set_debug(enabled: bool) -> None:
    """Turn on (or off) the content checks that synchronise with the GPU."""
    global _debug
    _debug = bool(enabled)


def debug_enabled() -> bool:
    """Whether the synchronising content checks run on CUDA tensors."""
    return _debug


def checks_contents(device: torch.device) -> bool:
    """Whether content checks run for tensors on ``device``: always off CUDA, on CUDA in debug mode."""
    return device.type != "cuda" or _debug


def _dtype_names(dtypes) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(op: str, name: str, x, dtypes=None, dim: int | None = None,
                 shape: tuple | None = None) -> torch.Tensor:
    """``x`` is a tensor, of one of ``dtypes``, ``dim``-D and of ``shape`` where those are given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{op}: `{name}` must have dtype {_dtype_names(dtypes)}, "
                        f"got {str(x.dtype).replace('torch.', '')}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{op}: `{name}` must be {dim}-D, got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: `{name}` must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """Every tensor of ``others`` (by name) is on ``ref``'s device."""
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}; "
                             f"all tensors must be on one device")


def check_matching(op: str, name: str, x, dtypes, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """``x`` is a tensor of ``dtypes`` on ``ref``'s device with ``ref``'s shape."""
    check_tensor(op, name, x, dtypes)
    check_same_device(op, ref_name, ref, **{name: x})
    if x.shape != ref.shape:
        raise ValueError(f"{op}: `{name}` must have the shape of `{ref_name}` {tuple(ref.shape)}, "
                         f"got {tuple(x.shape)}")
    return x


def check_index_range(op: str, name: str, idx: torch.Tensor, n: int) -> None:
    """A content check: every index of ``idx`` lies in [0, n). Runs where :func:`checks_contents`
    says (it reads the tensor)."""
    if idx.numel() and checks_contents(idx.device):
        lo, hi = (int(v) for v in idx.aminmax())
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{op}: `{name}` must lie in [0, {n}), found {bad}")


def check_finite(op: str, name: str, x: torch.Tensor) -> torch.Tensor:
    """A content check: every element of ``x`` is finite (where :func:`checks_contents` says)."""
    if checks_contents(x.device) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{op}: `{name}` must be finite")
    return x


def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


def check_real(op: str, name: str, x, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False) -> float:
    """A real number (not a bool), finite and within the bounds given (open or closed), as a float."""
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{op}: `{name}` must be a real number, got {type(x).__name__}")
    x = float(x)
    ok = math.isfinite(x)
    if lo is not None:
        ok = ok and (x > lo if lo_open else x >= lo)
    if hi is not None:
        ok = ok and (x < hi if hi_open else x <= hi)
    if not ok:
        where = _range_text(lo, hi, lo_open, hi_open)
        raise ValueError(f"{op}: `{name}` must be a finite number{' ' + where if where else ''}, got {x}")
    return x


def check_int(op: str, name: str, x, lo: int | None = None, hi: int | None = None) -> int:
    """An int (not a bool), at least ``lo`` and at most ``hi`` where given."""
    if isinstance(x, bool) or not isinstance(x, Integral):
        raise TypeError(f"{op}: `{name}` must be an int, got {x!r}")
    below, above = lo is not None and x < lo, hi is not None and x > hi
    if hi is not None and (below or above):
        where = f"lie in [{lo}, {hi}]" if lo is not None else f"be an int <= {hi}"
        raise ValueError(f"{op}: `{name}` must {where}, got {x!r}")
    if below:
        raise ValueError(f"{op}: `{name}` must be an int >= {lo}, got {x!r}")
    return int(x)


def check_flag(op: str, name: str, x) -> bool:
    """A bool, not merely something truthy (``"no"`` would switch a feature on)."""
    if not isinstance(x, bool):
        raise TypeError(f"{op}: `{name}` must be a bool (True or False), got {x!r}")
    return x


def check_choice(op: str, name: str, x, options: tuple):
    """One of ``options``."""
    if x not in options:
        raise ValueError(f"{op}: `{name}` must be one of {options}, got {x!r}")
    return x


def check_temperature(op: str, temperature, name: str = "temperature") -> float:
    """A softmax temperature: a finite T > 0 whose inverse is a finite float32 (T >= 2.9e-39), since
    every kernel scales the logits by 1/T in fp32. Returns it as a float."""
    temperature = check_real(op, name, temperature, lo=0.0, lo_open=True)
    if 1.0 / temperature > _FLOAT32_MAX:
        raise ValueError(f"{op}: `{name}` must be at least {1.0 / _FLOAT32_MAX:.6g} (its inverse must be a "
                         f"finite float32), got {temperature}")
    return temperature


def check_vaks_pairs(op: str, rows_name: str, rows: torch.Tensor, dst, src, eps):
    """VAKS pairs (Eq. 14) over the rows of ``rows``: ``dst`` and ``src`` int32/int64 [P] on its device,
    ``eps`` a float tensor [P] or one number, each in [0, 1]. Content checks (where
    :func:`checks_contents` says): indices in range, ``dst`` distinct, ``dst`` and ``src`` disjoint.
    Returns (dst int64, src int64, eps float32), contiguous."""
    check_tensor(op, "dst", dst, INDEX_DTYPES, 1)
    check_tensor(op, "src", src, INDEX_DTYPES, 1)
    check_same_device(op, rows_name, rows, dst=dst, src=src)
    pairs = dst.shape[0]
    if src.shape[0] != pairs:
        raise ValueError(f"{op}: `src` must have one index per `dst` index ({pairs}), got {src.shape[0]}")
    if isinstance(eps, torch.Tensor):
        check_tensor(op, "eps", eps, _EPS_DTYPES, 1)
        check_same_device(op, rows_name, rows, eps=eps)
        if eps.shape[0] != pairs:
            raise ValueError(f"{op}: `eps` must have one value per pair ({pairs}), got {eps.shape[0]}")
        eps_t = eps.to(torch.float32)
    else:
        eps_t = torch.full((pairs,), check_real(op, "eps", eps, lo=0.0, hi=1.0), dtype=torch.float32,
                           device=rows.device)
    n = rows.shape[0]
    if pairs and checks_contents(rows.device):
        check_index_range(op, "dst", dst, n)
        check_index_range(op, "src", src, n)
        if not bool(((eps_t >= 0) & (eps_t <= 1)).all()):
            raise ValueError(f"{op}: `eps` must lie in [0, 1]")
        hits = torch.zeros(n, dtype=torch.int32, device=rows.device)
        hits.index_add_(0, dst.long(), torch.ones_like(dst, dtype=torch.int32))
        if int(hits.max()) > 1:
            raise ValueError(f"{op}: `dst` must not repeat an index")
        if bool(hits.index_select(0, src.long()).any()):
            raise ValueError(f"{op}: `dst` and `src` must not share an index")
    return dst.long().contiguous(), src.long().contiguous(), eps_t.contiguous()


def check_plan_pairs(op: str, n: int, keep: torch.Tensor, k1l, k0, eps, names=("k1l", "k0", "eps")):
    """The VAKS pairs of a condensation plan (Sec. 3.4, Eq. 14) against its keep mask: L distinct kept
    points of K1L (int64), L distinct dropped partners of K0 (int64), and L ratios eps (float32) in
    [0, 1]. ``keep`` (bool [n], on the host) must keep at least one point. The contents are read, on
    the host, whatever the device. Returns the three tensors on the host."""
    if not bool(keep.any()):
        raise ValueError(f"{op}: `keep` must keep at least one point")
    for key, x, dtype in zip(names, (k1l, k0, eps), (torch.int64, torch.int64, torch.float32)):
        check_tensor(op, key, x, (dtype,))
        if x.dim() != 1 or x.shape != k1l.shape:
            raise ValueError(f"{op}: `{names[0]}`, `{names[1]}` and `{names[2]}` must be 1-D of one length, "
                             f"got `{key}` of shape {tuple(x.shape)}")
    k1l, k0, eps = k1l.detach().cpu(), k0.detach().cpu(), eps.detach().cpu()
    for key, idx, kept in ((names[0], k1l, True), (names[1], k0, False)):
        check_index_range(op, key, idx, n)
        if idx.unique().numel() != idx.numel():
            raise ValueError(f"{op}: `{key}` must not repeat a point")
        if not bool((keep[idx] == kept).all()):
            raise ValueError(f"{op}: every point of `{key}` must be {'kept' if kept else 'dropped'} by `keep`")
    if not bool(((eps >= 0) & (eps <= 1)).all()):
        raise ValueError(f"{op}: `{names[2]}` must lie in [0, 1]")
    return k1l, k0, eps
