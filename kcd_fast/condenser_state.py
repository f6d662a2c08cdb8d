"""The checkpoint formats of a :class:`~kcd_fast.KnowledgeCondenser`, as their loaders accept them.

:meth:`~kcd_fast.KnowledgeCondenser.load_state_dict` and
:meth:`~kcd_fast.KnowledgeCondenser.load_condensed` check everything here first, on the host (types,
dtypes, shapes, ranges, finiteness, the VAKS pairs of Eq. 14 against the keep mask), and change the
condenser only once all of it passed. These functions only read; the condenser is taken duck-typed
(``num_samples``, ``epochs``, ``stage_epochs``, ``num_stages``, ``num_kept()``, ``stage_before()``,
``world_size``, ``last_values``, ``official_record``, ``config()``).
"""
from __future__ import annotations

from numbers import Integral

import torch

from kcd_fast.checks import check_finite, check_flag, check_int, check_plan_pairs, check_tensor

__all__ = ["STATE_VERSION", "STATE_KEYS", "CONDENSED_KIND", "checked_state", "read_condensed", "pair_arrays"]

STATE_VERSION = 1
# The entries of a state_dict, every one required.
STATE_KEYS = ("config", "values", "counts", "keep", "partner", "eps", "pairs", "last_values", "synced", "next_epoch",
              "stage", "frozen", "loaded", "loaded_stage", "samples_yielded", "history")
CONDENSED_KIND = "kcd_fast.condensed"  # the "kind" of a file save_condensed writes


def checked_state(cond, state) -> dict:
    """The entries of ``state``, a :meth:`~kcd_fast.KnowledgeCondenser.state_dict` for the condenser
    ``cond`` (its configuration, N, epochs and stages), each checked, as host tensors and plain values."""
    where = "load_state_dict"
    if not isinstance(state, dict) or "version" not in state:
        raise ValueError(f"{where}: not a KnowledgeCondenser state_dict")
    if state["version"] != STATE_VERSION:
        raise ValueError(f"{where}: state version {state['version']} is not this kcd_fast's "
                         f"{STATE_VERSION}")
    required = STATE_KEYS + (("official_record",) if cond.official_record is not None else ())
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{where}: the state has no {', '.join(f'`{k}`' for k in missing)}")
    cfg, mine = state["config"], cond.config()
    if not isinstance(cfg, dict):
        raise TypeError(f"{where}: `config` must be a dict, got {type(cfg).__name__}")
    if cfg.get("num_samples") != cond.num_samples:
        raise ValueError(f"{where}: the state is for N={cfg.get('num_samples')} samples, this condenser "
                         f"has N={cond.num_samples}")
    diff = [f"{k}: {cfg.get(k)!r} (state) vs {v!r} (here)" for k, v in mine.items() if cfg.get(k) != v]
    if diff:
        raise ValueError(f"{where}: the state was made with another configuration: " + "; ".join(diff))
    checked = _checked_tensors(cond, where, state)
    checked.update(_checked_progress(cond, where, state, checked["keep"]))
    if cond.official_record is not None:
        checked["official_record"] = _checked_official_record(cond, where, state["official_record"])
    if cond.world_size > 1 and checked["synced"] is None:  # a single-process state: nothing to merge yet
        checked["synced"] = (checked["values"], checked["counts"], checked["last_values"])
    return checked


def _checked_tensors(cond, where: str, state: dict) -> dict:
    """The per-sample tensors of a state (values, counts, keep, the pairs and what they imply)."""
    n, ovr = cond.num_samples, cond.last_values is not None  # ovr: the "w/o OVR" ablation's last_values
    values = _host_vector(where, "values", state["values"], torch.float32, n, finite=True)
    counts = _host_vector(where, "counts", state["counts"], torch.int32, n)
    if bool((counts < 0).any()):
        raise ValueError(f"{where}: `counts` must be >= 0")
    keep = _host_vector(where, "keep", state["keep"], torch.bool, n)
    pairs = state["pairs"]
    if not isinstance(pairs, (tuple, list)) or len(pairs) != 3:
        raise ValueError(f"{where}: `pairs` must be a (k1l, k0, eps) triple")
    pairs = check_plan_pairs(where, n, keep, *pairs, names=("pairs[0]", "pairs[1]", "pairs[2]"))
    partner = _host_vector(where, "partner", state["partner"], torch.int32, n)
    eps = _host_vector(where, "eps", state["eps"], torch.float32, n)
    want_partner, want_eps = pair_arrays(n, *pairs)
    if not torch.equal(partner, want_partner) or not torch.equal(eps, want_eps):
        raise ValueError(f"{where}: `partner` and `eps` must match `pairs` (-1 and 0 outside K1L)")
    last_values = None
    if ovr:
        last_values = _host_vector(where, "last_values", state["last_values"], torch.float32, n, finite=True)
    synced = state["synced"]
    if synced is not None:
        if not isinstance(synced, (tuple, list)) or len(synced) != 3:
            raise ValueError(f"{where}: `synced` must be None or a (values, counts, last_values) triple")
        synced = (_host_vector(where, "synced[0]", synced[0], torch.float32, n, finite=True),
                  _host_vector(where, "synced[1]", synced[1], torch.int32, n),
                  _host_vector(where, "synced[2]", synced[2], torch.float32, n, finite=True) if ovr else None)
    return {"values": values, "counts": counts, "keep": keep, "pairs": pairs, "last_values": last_values,
            "synced": synced}


def _checked_progress(cond, where: str, state: dict, keep: torch.Tensor) -> dict:
    """Where a state is in the run (epoch, stage, frozen or loaded set, counts) and its history."""
    next_epoch = check_int(where, "next_epoch", state["next_epoch"], 0, cond.epochs)
    stage = check_int(where, "stage", state["stage"], -1, cond.num_stages - 1)
    frozen = check_flag(where, "frozen", state["frozen"])
    loaded, loaded_stage = check_flag(where, "loaded", state["loaded"]), state["loaded_stage"]
    if loaded_stage is not None:
        loaded_stage = _stage_and_tau(loaded_stage)
        if loaded_stage is None:
            raise ValueError(f"{where}: `loaded_stage` must be None or a (stage, tau) pair, "
                             f"got {state['loaded_stage']!r}")
    if not frozen:
        # The schedule's own set: the stage is the last boundary's, and it keeps that stage's |K1|.
        want_stage = cond.stage_before(next_epoch)
        if stage != want_stage:
            raise ValueError(f"{where}: `stage` {stage} does not follow `next_epoch` {next_epoch} "
                             f"(T={cond.stage_epochs}: stage {want_stage})")
        kept, want_kept = int(keep.sum()), (cond.num_samples if stage < 0 else cond.num_kept(stage))
        if not loaded and kept != want_kept:
            raise ValueError(f"{where}: `keep` holds {kept} samples, but stage {stage} keeps {want_kept}")
    yielded = state["samples_yielded"]
    if not isinstance(yielded, dict) or not all(
            isinstance(e, Integral) and not isinstance(e, bool) and isinstance(c, Integral)
            and not isinstance(c, bool) and e >= 0 and c >= 0 for e, c in yielded.items()):
        raise ValueError(f"{where}: `samples_yielded` must be a dict of epoch -> count (ints >= 0)")
    if not isinstance(state["history"], list):
        raise TypeError(f"{where}: `history` must be a list, got {type(state['history']).__name__}")
    return {"next_epoch": next_epoch, "stage": stage, "frozen": frozen, "loaded": loaded,
            "loaded_stage": loaded_stage, "samples_yielded": {int(e): int(c) for e, c in yielded.items()},
            "history": list(state["history"])}


def _checked_official_record(cond, where: str, record) -> dict:
    """protocol="official"'s record: this epoch's entropies (-1 or finite), the float64 sums of the
    positive ones (finite, >= 0), their counts (>= 0), and how many epochs it holds."""
    n = cond.num_samples
    if not isinstance(record, dict) or set(record) != {"epoch_entropy", "sum", "count", "epochs"}:
        raise ValueError(f"{where}: `official_record` must be a dict of epoch_entropy, sum, count and epochs")
    out = {"epoch_entropy": _host_vector(where, "official_record.epoch_entropy", record["epoch_entropy"],
                                         torch.float32, n, finite=True),
           "sum": _host_vector(where, "official_record.sum", record["sum"], torch.float64, n, finite=True),
           "count": _host_vector(where, "official_record.count", record["count"], torch.int32, n),
           "epochs": check_int(where, "official_record.epochs", record["epochs"], 0, cond.epochs)}
    if bool((out["sum"] < 0).any()) or bool((out["count"] < 0).any()):
        raise ValueError(f"{where}: `official_record` sums and counts must be >= 0")
    return out


def read_condensed(path, num_samples: int) -> tuple:
    """A file written by :meth:`~kcd_fast.KnowledgeCondenser.save_condensed` for ``num_samples`` points,
    checked in full (keys, dtypes, shapes, index ranges, the pairs of Eq. 14): (keep, k1l, k0, eps) on
    the host and the (stage, tau) it was made at (None where the file does not say)."""
    where = "load_condensed"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one holding more than tensors: not ours either way
        raise ValueError(f"{where}: {path} is not a file written by save_condensed "
                         f"(torch.load: {type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("kind") != CONDENSED_KIND:
        raise ValueError(f"{where}: {path} is not a file written by save_condensed")
    missing = [k for k in ("version", "num_samples", "keep", "k1l", "k0", "eps") if k not in blob]
    if missing:
        raise ValueError(f"{where}: {path} has no {', '.join(f'`{k}`' for k in missing)}")
    if blob["version"] != STATE_VERSION:
        raise ValueError(f"{where}: {path} has version {blob['version']}, not this kcd_fast's {STATE_VERSION}")
    if blob["num_samples"] != num_samples:
        raise ValueError(f"{where}: {path} holds N={blob['num_samples']} samples, this condenser has "
                         f"N={num_samples}")
    keep = _host_vector(where, "keep", blob["keep"], torch.bool, num_samples)
    k1l, k0, eps = check_plan_pairs(where, num_samples, keep, blob["k1l"], blob["k0"], blob["eps"])
    return keep, k1l, k0, eps, _stage_and_tau((blob.get("stage"), blob.get("tau")))


def _host_vector(where: str, key: str, x, dtype: torch.dtype, n: int, finite: bool = False) -> torch.Tensor:
    """A state entry that must be a tensor of ``dtype`` and shape [n] (and finite, with ``finite``), on the host."""
    x = check_tensor(where, key, x, (dtype,), shape=(n,)).detach().cpu()
    return check_finite(where, key, x) if finite else x


def _stage_and_tau(x) -> tuple | None:
    """``x`` as a (stage int, tau float) pair, the stage a condensed set was made at; None if it is not one."""
    ok = (isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], int) and not isinstance(x[0], bool)
          and isinstance(x[1], float))
    return (x[0], x[1]) if ok else None


def pair_arrays(n: int, k1l: torch.Tensor, k0: torch.Tensor, eps: torch.Tensor) -> tuple:
    """The per-point ``partner`` (-1 outside K1L) and ``eps`` (0 outside K1L) of a plan's pairs, on
    the pairs' device."""
    partner = torch.full((n,), -1, dtype=torch.int32, device=k1l.device)
    ratio = torch.zeros(n, dtype=torch.float32, device=k1l.device)
    partner[k1l] = k0.int()
    ratio[k1l] = eps
    return partner, ratio
