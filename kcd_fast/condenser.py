"""The KCD stage loop (Alg. 1) as a drop-in library: state, sampler, VAKS, resume, DDP, cost.

A few lines around an existing training loop give it KCD::

    condenser = kcd_fast.KnowledgeCondenser(len(train_set), epochs=240, stage_epochs=40, device="cuda")
    loader = DataLoader(kcd_fast.KCDDataset(train_set, condenser), batch_size=64,
                        sampler=condenser.sampler(), num_workers=8)
    for epoch in range(240):
        loader.sampler.set_epoch(epoch)
        for x, y, index in loader:
            logits = student(x.cuda())
            ...                                             # the usual KD step
            condenser.observe(index.cuda(non_blocking=True), logits)   # Eq. 7 + 12, no host sync
        condenser.end_epoch(epoch)                          # Alg. 1 lines 8-14 when epoch % T == 0

Per step only :func:`kcd_fast.ops.update_values` runs. Everything else happens
once per stage (or once per epoch, and then only on the host).
"""
from __future__ import annotations

import itertools
import math
import os
import weakref
from numbers import Integral, Real
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from kcd_fast import ops
from kcd_fast import reference as R

__all__ = ["KnowledgeCondenser", "KCDDataset", "KeptSampler"]

STATE_VERSION = 1
_SCHEDULES = ("exp", "linear")
_K0_POLICIES = ("dropped", "all")
_SELECTIONS = ("kcd", "random")
TRAJECTORY_POINTS = 256  # points whose rank likelihood (Eq. 8) is recorded at each stage, for Fig. 3(b)


def _int(name, x, lo):
    if isinstance(x, bool) or not isinstance(x, Integral):
        raise TypeError(f"KnowledgeCondenser: `{name}` must be an int, got {type(x).__name__}")
    if x < lo:
        raise ValueError(f"KnowledgeCondenser: `{name}` must be >= {lo}, got {x}")
    return int(x)


def _real(name, x):
    """A number (TypeError otherwise) that is finite (ValueError otherwise), as a float."""
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"KnowledgeCondenser: `{name}` must be a number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"KnowledgeCondenser: `{name}` must be finite, got {x}")
    return x


def _unit(name, x, lo_open=True):
    x = _real(name, x)
    if not ((0.0 < x) if lo_open else (0.0 <= x)) or x > 1.0:
        raise ValueError(f"KnowledgeCondenser: `{name}` must lie in {'(0' if lo_open else '[0'}, 1], got {x}")
    return x


def _flag(name, x):
    """A bool, not merely something truthy (``"no"`` would switch a feature on)."""
    if not isinstance(x, bool):
        raise TypeError(f"KnowledgeCondenser: `{name}` must be True or False, got {x!r}")
    return x


def _choice(name, x, options):
    if x not in options:
        raise ValueError(f"KnowledgeCondenser: `{name}` must be one of {options}, got {x!r}")
    return x


def _dist_info(rank, world_size):
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"KnowledgeCondenser: `rank` must lie in [0, world_size={world_size}), got {rank}")
    return int(rank), int(world_size)


def _record_last_visit_(last_values: torch.Tensor, indices: torch.Tensor, entropy: torch.Tensor) -> None:
    """The "w/o OVR" ablation's record: ``last_values[i]`` becomes the entropy of i's LAST finite visit.

    Deterministic on every device, with no host sync: where an index occurs more than once in the
    batch (a sampler with replacement), a plain ``index_put_`` has no defined winner on CUDA. Here
    each batch position's key (index, finite, position) is sorted; the last key of an index's run
    is its latest finite visit, or a non-finite one if it has none (then the old value stays). Every
    position then writes the value of its run's last key, so duplicates write the same number.
    An index outside [0, N) (flagged by :func:`ops.update_values`) records nothing.
    """
    n, b = last_values.numel(), indices.numel()
    if b == 0:
        return
    idx = indices.to(last_values.device).long()
    in_range = (idx >= 0) & (idx < n)
    idx = torch.where(in_range, idx, 0)
    fresh = torch.isfinite(entropy) & in_range
    pos = torch.arange(b, device=idx.device)
    keys, order = torch.sort(idx * (2 * b) + fresh.long() * b + pos)
    run = keys // (2 * b)                                   # the sorted indices
    last = torch.searchsorted(run, run, right=True) - 1     # each position's run end
    winner = order[last]
    value = torch.where(fresh[winner], entropy[winner].float(), last_values[run])
    last_values.index_put_((run,), value)


class KnowledgeCondenser:
    """The knowledge space of KCD and its EM stage loop (Alg. 1).

    Args:
        num_samples: N, the size of the training set (the knowledge space K).
        epochs: I, the number of training epochs.
        stage_epochs: T, the epochs of one stage; must divide ``epochs``.
        rho: ρ, the final kept fraction, in (0, 1].
        alpha: α of the cost-aware ranking (Eq. 13); 0 is the "w/o CAR" ablation.
        eps_max: ε_m of Eq. 15, in (0, 1].
        schedule: ``"exp"`` (the paper, τ^t = ρ^((t+1)/S)) or ``"linear"`` (the official code).
        k0: ``"dropped"`` (official code) or ``"all"`` (paper text); see :func:`kcd_fast.ops.condense`.
        selection: ``"kcd"`` or ``"random"`` (the "OGVE w/ random" ablation: a random ranking).
        online_recording: False is the "w/o OVR" ablation: a point's value is the entropy of its
            last visit instead of the running mean of Eq. 12. Under DDP the ranks' records merge
            at each stage end; a point that several ranks visited within one stage (with T > 1
            epochs a stage, or the sampler's padding repeat) gets the mean of their last visits,
            since the ranks do not share the order of their visits.
        vaks: False is the "direct selection" ablation: K^ = K1, no augmentation.
        adaptive_eps: False is the "KA (ε = ε_m)" ablation.
        temperature: softmax temperature of the recorded entropy.
        device: where the per-sample state lives (the student's device).
        seed: seeds the sampler's shuffles and the random ranking (reproducible, and
            independent of the global RNG).
        rank, world_size: the DDP position; taken from torch.distributed when None.

    State (all O(N) on ``device``, see :meth:`bytes_per_sample`): ``values`` (V^F),
    ``counts`` (F), ``keep`` (the condensed set), ``partner`` and ``eps`` (the VAKS pair of
    each K1L point; -1 and 0 elsewhere).
    """

    def __init__(self, num_samples: int, *, epochs: int, stage_epochs: int, rho: float = 0.7,
                 alpha: float = 0.03, eps_max: float = 0.3, schedule: str = "exp", k0: str = "dropped",
                 selection: str = "kcd", online_recording: bool = True, vaks: bool = True,
                 adaptive_eps: bool = True, temperature: float = 1.0, device: torch.device | str = "cpu",
                 seed: int = 0, rank: int | None = None, world_size: int | None = None):
        self.num_samples = _int("num_samples", num_samples, 1)
        self.epochs = _int("epochs", epochs, 1)
        self.stage_epochs = _int("stage_epochs", stage_epochs, 1)
        if self.stage_epochs > self.epochs:
            raise ValueError(f"KnowledgeCondenser: `stage_epochs` ({stage_epochs}) must not exceed "
                             f"`epochs` ({epochs})")
        if self.epochs % self.stage_epochs:
            raise ValueError(f"KnowledgeCondenser: `stage_epochs` ({stage_epochs}) must divide `epochs` "
                             f"({epochs}) into whole stages")
        self.rho = _unit("rho", rho)
        self.eps_max = _unit("eps_max", eps_max)
        self.alpha = _real("alpha", alpha)
        if self.alpha < 0:
            raise ValueError(f"KnowledgeCondenser: `alpha` must be >= 0, got {alpha!r}")
        # As update_values checks it at every observe (1/T a finite float32), but once, here.
        self.temperature = ops._check_temperature("KnowledgeCondenser", temperature)
        self.schedule = _choice("schedule", schedule, _SCHEDULES)
        self.k0 = _choice("k0", k0, _K0_POLICIES)
        self.selection = _choice("selection", selection, _SELECTIONS)
        self.online_recording = _flag("online_recording", online_recording)
        self.vaks = _flag("vaks", vaks)
        self.adaptive_eps = _flag("adaptive_eps", adaptive_eps)
        self.seed = _int("seed", seed, 0)
        self.device = torch.device(device)
        rank = None if rank is None else _int("rank", rank, 0)
        world_size = None if world_size is None else _int("world_size", world_size, 1)
        self._world_from_group = world_size is None  # taken from the process group (or 1 without one)
        self.rank, self.world_size = _dist_info(rank, world_size)
        if self.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"KnowledgeCondenser: world_size={self.world_size} needs an initialised "
                             f"torch.distributed process group (the ranks' records are merged at each stage end); "
                             f"for samplers of other ranks without one, use sampler(rank=..., world_size=...)")
        self.num_stages = self.epochs // self.stage_epochs
        smallest = min(self.num_kept(t) for t in range(self.num_stages))
        if smallest < 1:
            raise ValueError(f"KnowledgeCondenser: `num_samples`={self.num_samples} with `rho`={self.rho} keeps "
                             f"{smallest} points at the last stage (floor(tau^t N), Eq. 8); every stage must keep "
                             f"at least one: raise rho or num_samples")

        n, dev = self.num_samples, self.device
        self.values = torch.zeros(n, dtype=torch.float32, device=dev)
        self.device = dev = self.values.device  # "cuda" -> "cuda:<current>", fixed from here on
        self.counts = torch.zeros(n, dtype=torch.int32, device=dev)
        self.keep = torch.ones(n, dtype=torch.bool, device=dev)
        self.partner = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.eps = torch.zeros(n, dtype=torch.float32, device=dev)
        # The "w/o OVR" ablation ranks by the last visit's entropy.
        self.last_values = None if self.online_recording else torch.zeros(n, dtype=torch.float32, device=dev)
        # DDP: the state at the last merge, to send only this stage's deltas.
        self._synced = None
        if self.world_size > 1:
            self._synced = (self.values.clone(), self.counts.clone(),
                            None if self.last_values is None else self.last_values.clone())
        # Host copies for the samplers and the loader workers (shared memory: workers see updates).
        self._kept_cpu = torch.arange(n, dtype=torch.int64)
        self._partner_cpu = torch.full((n,), -1, dtype=torch.int32).share_memory_()
        self._eps_cpu = torch.zeros(n, dtype=torch.float32).share_memory_()
        self.pairs = (torch.empty(0, dtype=torch.int64, device=dev), torch.empty(0, dtype=torch.int64, device=dev),
                      torch.empty(0, dtype=torch.float32, device=dev))
        self.next_epoch = 0          # end_epoch() expects this epoch next
        self.stage = -1              # the last stage condensed (-1: none yet)
        self.frozen = False          # True after load_condensed(freeze=True): no more condensation
        self._loaded_stage = None    # (stage, tau) of the file load_condensed read: what a frozen set is
        self._loaded = False         # the keep mask came from load_condensed (not from this schedule)
        self.samples_yielded = {}    # epoch -> samples this rank's samplers yielded
        self.history = []            # one summary dict per condensation
        g = torch.Generator().manual_seed(self.seed)
        self.trajectory_points = torch.randperm(n, generator=g)[: min(n, TRAJECTORY_POINTS)].sort().values
        self._samplers = weakref.WeakSet()

    def __getstate__(self) -> dict:
        # pickle / torch.save of a condenser (or of a sampler, which holds it): the weak set of samplers
        # cannot be pickled, and a copy starts without any (its samplers are made from it again).
        state = self.__dict__.copy()
        state["_samplers"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._samplers = weakref.WeakSet()

    # ------------------------------------------------------------------ bookkeeping

    def bytes_per_sample(self) -> dict:
        """Memory of the per-sample state: on ``device`` and on the host."""
        device = 4 + 4 + 1 + 4 + 4  # values, counts, keep, partner, eps
        if self.last_values is not None:
            device += 4
        if self._synced is not None:
            device += 8 + (4 if self.last_values is not None else 0)
        return {"device": device, "host": 8 + 4 + 4}  # kept index list (at most), partner, eps

    def kept_indices(self) -> torch.Tensor:
        """The condensed set K^ as ascending int64 indices, on the host."""
        return self._kept_cpu

    def tau(self, stage: int) -> float:
        """τ^t of the schedule."""
        return R.tau(stage, self.rho, self.num_stages, self.schedule)

    def num_kept(self, stage: int) -> int:
        """|K1| at stage t."""
        return R.num_kept(self.num_samples, stage, self.rho, self.num_stages, self.schedule)

    def is_boundary(self, epoch: int) -> bool:
        """Alg. 1 line 8: condensation at the end of epoch i when i % T == 0."""
        return epoch % self.stage_epochs == 0

    def planned_samples(self, epoch: int) -> int:
        """Samples the schedule plans for ``epoch`` (all ranks together, before DDP padding)."""
        if epoch == 0:
            return self.num_samples
        stage = min((epoch - 1) // self.stage_epochs, self.num_stages - 1)
        return self.num_kept(stage)

    def predicted_cost(self) -> dict:
        """C predicted from the schedule: by Eq. 16, and by the exact per-epoch counts. A frozen set
        (:meth:`load_condensed`) trains on its kept points every epoch: ``schedule`` is then its kept
        fraction (from the first epoch on), and Eq. 16, which describes a schedule, is None."""
        if self.frozen:
            return {"eq16": None, "schedule": int(self._kept_cpu.numel()) / self.num_samples}
        taus = [self.tau(t) for t in range(self.num_stages)]
        planned = sum(self.planned_samples(e) for e in range(self.epochs))
        return {"eq16": R.relative_cost(taus, self.stage_epochs, self.epochs),
                "schedule": planned / (self.num_samples * self.epochs)}

    def measured_cost(self) -> dict:
        """C_a and C measured from what the samplers yielded (all ranks), over the epochs run so far.

        C is C_a over what full epochs would pass on the same ranks: N in one process, and under DDP
        DistributedSampler's padded ceil(N / W) * W, so that the full-set KD baseline is exactly 1.
        Counted: this condenser's own samplers only (:meth:`sampler`), as their epochs finish
        (with ``batch_size=``, batch by batch)."""
        return self._cost(self.samples_yielded)

    def _cost(self, samples_yielded: dict) -> dict:
        epochs = sorted(samples_yielded)
        passed = sum(samples_yielded[e] for e in epochs) * self.world_size
        full = math.ceil(self.num_samples / self.world_size) * self.world_size * len(epochs)
        return {"epochs": len(epochs), "C_a": passed, "C": passed / full if full else float("nan"),
                "per_epoch": {e: samples_yielded[e] * self.world_size for e in epochs}}

    # ------------------------------------------------------------------ M-step side: per step

    def observe(self, indices: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Record a batch's entropies (Eq. 7) into V^F and F (Eq. 12). Returns the entropies.

        This is the only per-step call: one fused kernel on CUDA, no host sync
        (pass ``indices`` on the condenser's device).
        """
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"observe: `indices` must be a torch.Tensor of dataset indices, got "
                            f"{type(indices).__name__}")
        if self.next_epoch >= self.epochs:
            raise ValueError(f"observe: all {self.epochs} epochs of this condenser have ended; make it with more "
                             f"`epochs` to train longer")
        if indices.device != self.device:
            indices = indices.to(self.device, non_blocking=True)
        entropy = ops.update_values(self.values, self.counts, indices, logits, temperature=self.temperature)
        if self.last_values is not None:
            _record_last_visit_(self.last_values, indices, entropy)
        return entropy

    def _note_yield(self, epoch: int, count: int) -> None:
        self.samples_yielded[epoch] = self.samples_yielded.get(epoch, 0) + count

    # ------------------------------------------------------------------ E-step: per stage

    def end_epoch(self, epoch: int) -> ops.CondensePlan | None:
        """Close epoch ``epoch`` (0-based). At a stage boundary (epoch % T == 0), condense.

        Returns the new plan, or None when the epoch is not a boundary. Every DDP
        rank must call this every epoch; at a boundary it runs ONE collective.
        If it raises, the epoch stays open (``next_epoch``, the plan and the history are unchanged)
        and can be ended again; a DDP merge that already ran is kept (it changes no record).
        """
        if isinstance(epoch, bool) or not isinstance(epoch, Integral):
            raise TypeError(f"end_epoch: `epoch` must be an int, got {type(epoch).__name__}")
        epoch = int(epoch)
        if epoch != self.next_epoch:
            raise ValueError(f"end_epoch: expected epoch {self.next_epoch}, got {epoch}; call it once per epoch, "
                             f"in order (after a resume, load the checkpoint's state_dict first)")
        if epoch >= self.epochs:
            raise ValueError(f"end_epoch: epoch {epoch} is past the last epoch ({self.epochs - 1})")
        self._check_world("end_epoch")
        plan = None
        if not self.frozen and self.is_boundary(epoch):
            flagged = self._merge_ranks()  # under DDP, with every rank's error flag
            # Out-of-range indices the CUDA kernel skipped this stage, on this rank or another: every
            # rank raises together (a rank raising alone would leave the others in a collective).
            ops.check_errors(self.device)
            if flagged:
                raise ops._out_of_range_error("another rank")
            plan = self._condense(epoch // self.stage_epochs, epoch)
        # Only now that the stage end succeeded does the epoch close.
        self.samples_yielded.setdefault(epoch, 0)
        self.next_epoch = epoch + 1
        return plan

    def _merge_ranks(self) -> int:
        """One all_reduce of the deltas since the last merge: every rank then holds the single-process state.

        For each point, rank r contributes dF_r = F_r - F0 and dS_r = F_r V_r - F0 V0 (the sum of
        its new entropies); the merged state is F = F0 + sum dF_r, V = (F0 V0 + sum dS_r) / F (Eq. 12).
        It runs at each stage end and in :meth:`state_dict`; merging early only moves (F0, V0).
        The same all_reduce carries each rank's out-of-range flag (:func:`ops.check_errors`):
        returns how many OTHER ranks have theirs raised (0 in one process).
        """
        if self.world_size == 1:
            return 0
        v0, f0, l0 = self._synced
        n = self.num_samples
        f0d, v0d = f0.double(), v0.double()
        parts = [self.counts.double() - f0d, self.counts.double() * self.values.double() - f0d * v0d]
        if self.last_values is not None:
            changed = (self.last_values != l0).double()
            parts += [changed, changed * self.last_values.double()]
        flag = ops._raised_flag(self.device)
        mine = flag.double() if flag is not None else torch.zeros(1, dtype=torch.float64, device=self.device)
        packed = torch.cat(parts + [mine])
        dist.all_reduce(packed)
        others = packed[-1] - mine[0]
        d_count, d_sum = packed[:n], packed[n:2 * n]
        f = f0d + d_count
        self.values.copy_(torch.where(f > 0, (f0d * v0d + d_sum) / f.clamp_min(1.0), v0d).float())
        self.counts.copy_(f.round().int())
        if self.last_values is not None:
            hits, total = packed[2 * n:3 * n], packed[3 * n:4 * n]
            self.last_values.copy_(torch.where(hits > 0, total / hits.clamp_min(1.0), l0.double()).float())
        self._synced = (self.values.clone(), self.counts.clone(),
                        None if self.last_values is None else self.last_values.clone())
        return int(others.item())  # a stage end (or a checkpoint): a sync here is cheap

    def _ranking_values(self) -> torch.Tensor:
        return self.values if self.last_values is None else self.last_values

    def _condense(self, stage: int, epoch: int) -> ops.CondensePlan:
        values = self._ranking_values()
        order = None
        if self.selection == "random":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + stage)
            order = torch.randperm(self.num_samples, generator=g).to(self.device)
        plan = ops.condense(values, self.counts, keep=self.num_kept(stage), alpha=self.alpha,
                            eps_max=self.eps_max, previous_keep=self.keep, k0=self.k0,
                            adaptive_eps=self.adaptive_eps, order=order)
        if not self.vaks:
            empty = plan.k1l[:0]
            plan = ops.CondensePlan(plan.keep, plan.order, empty, empty, plan.eps[:0], plan.num_kept, plan.num_k0)
        summary = self._summary(plan, stage, epoch, values)
        self._apply_plan(plan)
        self.stage = stage
        self.history.append(summary)
        return plan

    def _apply_plan(self, plan: ops.CondensePlan) -> None:
        self._apply(plan.keep, plan.k1l, plan.k0, plan.eps)

    def _apply(self, keep, k1l, k0, eps) -> None:
        """Make (keep, K1L, K0, eps) the condensed set, with the per-point partner and eps they imply."""
        partner, ratio = _pair_arrays(self.num_samples, k1l, k0, eps)
        self.keep.copy_(keep)
        self.partner.copy_(partner)
        self.eps.copy_(ratio)
        self.pairs = (k1l, k0, eps)
        self._kept_cpu = keep.nonzero().flatten().cpu()
        self._partner_cpu.copy_(partner.cpu())
        self._eps_cpu.copy_(ratio.cpu())

    def _summary(self, plan, stage, epoch, values) -> dict:
        """The stage's record for summary.json and the plots: counts, tau, C so far, and the value
        statistics of :func:`stage_value_stats` (worked out on the values' device, read in one transfer)."""
        pairs = int(plan.k1l.numel())
        stats = stage_value_stats(values, plan.keep, plan.num_kept, plan.order, self.trajectory_points)
        return {
            "stage": stage, "epoch": epoch, "tau": self.tau(stage), "kept": plan.num_kept,
            "k1h": plan.num_kept - pairs, "k1l": pairs, "k0": plan.num_k0,
            "mean_value_kept": stats["mean_kept"], "mean_value_dropped": stats["mean_dropped"],
            "C_so_far": self._cost({epoch: 0, **self.samples_yielded})["C"],
            "value_quantiles_kept": stats["quantiles_kept"],
            "value_quantiles_dropped": stats["quantiles_dropped"],
            "value_hist": stats["hist"],
            "rank_likelihood": stats["rank_likelihood"],
        }

    # ------------------------------------------------------------------ VAKS

    def mix_buffer_(self, buffer: torch.Tensor) -> torch.Tensor:
        """Apply the current plan's pairs to an in-memory [N, ...] buffer, in place (Eq. 14).

        Persistent, as the official code does for CIFAR pixels: call it once
        after each condensation, and the mixes compound across stages.
        """
        if not isinstance(buffer, torch.Tensor):
            raise TypeError(f"mix_buffer_: `buffer` must be a torch.Tensor, got {type(buffer).__name__}")
        if buffer.dim() < 1 or buffer.shape[0] != self.num_samples:
            raise ValueError(f"mix_buffer_: `buffer` must have one row per sample ({self.num_samples}), "
                             f"got shape {tuple(buffer.shape)}")
        k1l, k0, eps = self.pairs
        return ops.vaks_mix_(buffer, k1l.to(buffer.device), k0.to(buffer.device), eps.to(buffer.device))

    # ------------------------------------------------------------------ data

    def _check_world(self, where: str) -> None:
        """A condenser made before ``init_process_group`` took world_size 1 and would silently run one
        process's KCD on every rank (each its own keep mask): refused once the group exists."""
        if (self._world_from_group and self.world_size == 1 and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            raise ValueError(f"KnowledgeCondenser.{where}: this condenser was made before "
                             f"torch.distributed.init_process_group, so it runs one process's KCD on each of the "
                             f"{dist.get_world_size()} ranks; make it after init_process_group (or pass "
                             f"world_size=1 to mean exactly that)")

    def sampler(self, batch_size: int | None = None, shuffle: bool = True, drop_last: bool = False,
                rank: int | None = None, world_size: int | None = None) -> "KeptSampler":
        """A Sampler over the condensed set (see :class:`KeptSampler`)."""
        if rank is None and world_size is None:
            self._check_world("sampler")
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        s = KeptSampler(self, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, rank=rank,
                        world_size=world_size)
        self._samplers.add(s)
        return s

    # ------------------------------------------------------------------ state

    def _config(self) -> dict:
        return {k: getattr(self, k) for k in (
            "num_samples", "epochs", "stage_epochs", "rho", "alpha", "eps_max", "schedule", "k0", "selection",
            "online_recording", "vaks", "adaptive_eps", "temperature", "seed")}

    def state_dict(self) -> dict:
        """Everything needed to continue the run exactly: config, progress and host copies of the state.

        The tensors are copies (they do not follow the run after the call).

        Under DDP (world_size > 1) this is a COLLECTIVE that EVERY rank must call, at the same
        point (e.g. all ranks, right before rank 0 saves the checkpoint): it first merges the
        ranks' records since the last merge (:meth:`_merge_ranks`, the merge of each stage end),
        so the state holds no per-rank deltas and every rank can load it. The merge only moves
        the sync point: the next stage end merges the deltas recorded since, so the records stay
        those of one process observing all ranks' batches (Eq. 12), up to float32 rounding.
        """
        self._merge_ranks()

        def host(t):
            return None if t is None else t.detach().to("cpu", copy=True)

        return {
            "version": STATE_VERSION, "config": self._config(),
            "values": host(self.values), "counts": host(self.counts), "keep": host(self.keep),
            "partner": host(self.partner), "eps": host(self.eps),
            "pairs": tuple(host(t) for t in self.pairs),
            "last_values": host(self.last_values),
            "synced": None if self._synced is None else tuple(host(t) for t in self._synced),
            "next_epoch": self.next_epoch, "stage": self.stage, "frozen": self.frozen,
            "loaded": self._loaded, "loaded_stage": self._loaded_stage,
            "samples_yielded": dict(self.samples_yielded),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. Refuses a state of another version, N or configuration.

        Every key is checked (type, dtype, shape, range, finiteness, consistency of the pairs)
        before anything changes: a refused state leaves the condenser as it was.
        """
        where = "load_state_dict"
        if not isinstance(state, dict) or "version" not in state:
            raise ValueError(f"{where}: not a KnowledgeCondenser state_dict")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"{where}: state version {state['version']} is not this kcd_fast's "
                             f"{STATE_VERSION}")
        missing = [k for k in ("config", "values", "counts", "keep", "partner", "eps", "pairs", "last_values",
                               "synced", "next_epoch", "stage", "frozen", "samples_yielded", "history")
                   if k not in state]
        if missing:
            raise ValueError(f"{where}: the state has no {', '.join(f'`{k}`' for k in missing)}")
        cfg, mine = state["config"], self._config()
        if not isinstance(cfg, dict):
            raise TypeError(f"{where}: `config` must be a dict, got {type(cfg).__name__}")
        if cfg.get("num_samples") != self.num_samples:
            raise ValueError(f"{where}: the state is for N={cfg.get('num_samples')} samples, this condenser "
                             f"has N={self.num_samples}")
        diff = [f"{k}: {cfg.get(k)!r} (state) vs {v!r} (here)" for k, v in mine.items() if cfg.get(k) != v]
        if diff:
            raise ValueError(f"{where}: the state was made with another configuration: " + "; ".join(diff))
        n = self.num_samples
        values = _finite(where, "values", _host_tensor(where, "values", state["values"], torch.float32, n))
        counts = _host_tensor(where, "counts", state["counts"], torch.int32, n)
        if bool((counts < 0).any()):
            raise ValueError(f"{where}: `counts` must be >= 0")
        keep = _host_tensor(where, "keep", state["keep"], torch.bool, n)
        pairs = state["pairs"]
        if not isinstance(pairs, (tuple, list)) or len(pairs) != 3:
            raise ValueError(f"{where}: `pairs` must be a (k1l, k0, eps) triple")
        pairs = _check_pairs(where, n, keep, *pairs, names=("pairs[0]", "pairs[1]", "pairs[2]"))
        partner = _host_tensor(where, "partner", state["partner"], torch.int32, n)
        eps = _host_tensor(where, "eps", state["eps"], torch.float32, n)
        want_partner, want_eps = _pair_arrays(n, *pairs)
        if not torch.equal(partner, want_partner) or not torch.equal(eps, want_eps):
            raise ValueError(f"{where}: `partner` and `eps` must match `pairs` (-1 and 0 outside K1L)")
        last_values = None
        if self.last_values is not None:
            last_values = _finite(where, "last_values",
                                  _host_tensor(where, "last_values", state["last_values"], torch.float32, n))
        synced = state["synced"]
        if synced is not None:
            if not isinstance(synced, (tuple, list)) or len(synced) != 3:
                raise ValueError(f"{where}: `synced` must be None or a (values, counts, last_values) triple")
            sv = _finite(where, "synced[0]", _host_tensor(where, "synced[0]", synced[0], torch.float32, n))
            sc = _host_tensor(where, "synced[1]", synced[1], torch.int32, n)
            sl = None
            if self.last_values is not None:
                sl = _finite(where, "synced[2]", _host_tensor(where, "synced[2]", synced[2], torch.float32, n))
            synced = (sv, sc, sl)
        next_epoch = _state_int(where, "next_epoch", state["next_epoch"], 0, self.epochs)
        stage = _state_int(where, "stage", state["stage"], -1, self.num_stages - 1)
        frozen = state["frozen"]
        if not isinstance(frozen, bool):
            raise TypeError(f"{where}: `frozen` must be a bool, got {type(frozen).__name__}")
        # States saved before these keys existed: a set from load_condensed, as frozen says.
        loaded, loaded_stage = state.get("loaded", frozen), state.get("loaded_stage")
        if not isinstance(loaded, bool):
            raise TypeError(f"{where}: `loaded` must be a bool, got {type(loaded).__name__}")
        if loaded_stage is not None:
            if not (isinstance(loaded_stage, (tuple, list)) and len(loaded_stage) == 2
                    and isinstance(loaded_stage[0], int) and not isinstance(loaded_stage[0], bool)
                    and isinstance(loaded_stage[1], float)):
                raise ValueError(f"{where}: `loaded_stage` must be None or a (stage, tau) pair, got {loaded_stage!r}")
            loaded_stage = (loaded_stage[0], loaded_stage[1])
        if not frozen:
            # The schedule's own set: the stage is the last boundary's, and it keeps that stage's |K1|.
            want_stage = -1 if next_epoch == 0 else min((next_epoch - 1) // self.stage_epochs, self.num_stages - 1)
            if stage != want_stage:
                raise ValueError(f"{where}: `stage` {stage} does not follow `next_epoch` {next_epoch} "
                                 f"(T={self.stage_epochs}: stage {want_stage})")
            kept, want_kept = int(keep.sum()), (n if stage < 0 else self.num_kept(stage))
            if not loaded and kept != want_kept:
                raise ValueError(f"{where}: `keep` holds {kept} samples, but stage {stage} keeps {want_kept}")
        yielded = state["samples_yielded"]
        if not isinstance(yielded, dict) or not all(
                isinstance(e, Integral) and not isinstance(e, bool) and isinstance(c, Integral)
                and not isinstance(c, bool) and e >= 0 and c >= 0 for e, c in yielded.items()):
            raise ValueError(f"{where}: `samples_yielded` must be a dict of epoch -> count (ints >= 0)")
        if not isinstance(state["history"], list):
            raise TypeError(f"{where}: `history` must be a list, got {type(state['history']).__name__}")
        if self.world_size > 1 and synced is None:
            synced = (values, counts, last_values)  # a single-process state: nothing to merge yet
        # Everything checked: build the device tensors, then commit.
        dev = self.device
        new_pairs = tuple(t.to(dev, copy=True) for t in pairs)
        new_synced = None
        if self.world_size > 1:
            new_synced = tuple(None if t is None else t.to(dev, copy=True) for t in synced)
        self.values.copy_(values)
        self.counts.copy_(counts)
        self._apply(keep.to(dev), *new_pairs)  # partner and eps: checked above to be the ones pairs imply
        if self.last_values is not None:
            self.last_values.copy_(last_values)
        if self.world_size > 1:
            self._synced = new_synced
        self.next_epoch, self.stage, self.frozen = next_epoch, stage, frozen
        self._loaded, self._loaded_stage = loaded, loaded_stage
        self.samples_yielded = {int(e): int(c) for e, c in yielded.items()}
        self.history = list(state["history"])

    def save_condensed(self, path: str | os.PathLike) -> None:
        """Export the condensed knowledge K^ (the keep mask and the VAKS pairs) to reuse it (Fig. 4)."""
        k1l, k0, eps = self.pairs
        stage, tau = self.stage, self.tau(self.stage) if self.stage >= 0 else 1.0
        if self.frozen and self._loaded_stage is not None:  # the loaded set, as its file described it
            stage, tau = self._loaded_stage
        torch.save({"kind": "kcd_fast.condensed", "version": STATE_VERSION, "num_samples": self.num_samples,
                    "stage": stage, "tau": tau,
                    "keep": self.keep.cpu(), "k1l": k1l.cpu(), "k0": k0.cpu(), "eps": eps.cpu(),
                    "config": self._config()}, path)

    def load_condensed(self, path: str | os.PathLike, freeze: bool = True) -> ops.CondensePlan:
        """Use condensed knowledge saved by :meth:`save_condensed` (e.g. to re-distil from scratch on K^).

        With ``freeze``, no further condensation happens: every epoch trains on the loaded set.
        The file is checked in full (keys, dtypes, shapes, index ranges, the pairs of Eq. 14)
        before anything changes.
        """
        where = "load_condensed"
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # not a torch file, or one holding more than tensors: not ours either way
            raise ValueError(f"{where}: {path} is not a file written by save_condensed "
                             f"(torch.load: {type(exc).__name__})") from None
        if not isinstance(blob, dict) or blob.get("kind") != "kcd_fast.condensed":
            raise ValueError(f"{where}: {path} is not a file written by save_condensed")
        missing = [k for k in ("version", "num_samples", "keep", "k1l", "k0", "eps") if k not in blob]
        if missing:
            raise ValueError(f"{where}: {path} has no {', '.join(f'`{k}`' for k in missing)}")
        if blob["version"] != STATE_VERSION:
            raise ValueError(f"{where}: {path} has version {blob['version']}, not this kcd_fast's {STATE_VERSION}")
        if blob["num_samples"] != self.num_samples:
            raise ValueError(f"{where}: {path} holds N={blob['num_samples']} samples, this condenser has "
                             f"N={self.num_samples}")
        keep = _host_tensor(where, "keep", blob["keep"], torch.bool, self.num_samples)
        k1l, k0, eps = _check_pairs(where, self.num_samples, keep, blob["k1l"], blob["k0"], blob["eps"])
        dev = self.device
        keep = keep.to(dev)
        order = torch.cat([keep.nonzero().flatten(), (~keep).nonzero().flatten()])
        plan = ops.CondensePlan(keep, order, k1l.to(dev), k0.to(dev), eps.to(dev), int(keep.sum()), int(k0.numel()))
        self._apply_plan(plan)
        self.frozen, self._loaded = bool(freeze), True
        stage, tau = blob.get("stage"), blob.get("tau")
        ok = isinstance(stage, int) and not isinstance(stage, bool) and isinstance(tau, float)
        self._loaded_stage = (stage, tau) if ok else None
        return plan


def _host_tensor(where: str, key: str, x, dtype: torch.dtype, n: int) -> torch.Tensor:
    """A state entry that must be a tensor of ``dtype`` and shape [n], on the host."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: `{key}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != dtype:
        raise TypeError(f"{where}: `{key}` must have dtype {dtype}, got {x.dtype}")
    if tuple(x.shape) != (n,):
        raise ValueError(f"{where}: `{key}` must have shape ({n},), got {tuple(x.shape)}")
    return x.detach().cpu()


def _finite(where: str, key: str, x: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{where}: `{key}` must be finite")
    return x


def _state_int(where: str, key: str, x, lo: int, hi: int) -> int:
    if isinstance(x, bool) or not isinstance(x, Integral):
        raise TypeError(f"{where}: `{key}` must be an int, got {type(x).__name__}")
    if not lo <= x <= hi:
        raise ValueError(f"{where}: `{key}` must lie in [{lo}, {hi}], got {x}")
    return int(x)


def _check_pairs(where, n, keep, k1l, k0, eps, names=("k1l", "k0", "eps")):
    """The VAKS pairs of a plan (Sec. 3.4, Eq. 14): L distinct kept points of K1L, L distinct dropped
    partners of K0, and L ratios eps in [0, 1]. ``keep`` (bool [n], host) must keep at least one point.
    Returns the three tensors on the host."""
    if not bool(keep.any()):
        raise ValueError(f"{where}: `keep` must keep at least one point")
    for key, x, dtype in zip(names, (k1l, k0, eps), (torch.int64, torch.int64, torch.float32)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: `{key}` must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != dtype:
            raise TypeError(f"{where}: `{key}` must have dtype {dtype}, got {x.dtype}")
        if x.dim() != 1 or x.shape != k1l.shape:
            raise ValueError(f"{where}: `{names[0]}`, `{names[1]}` and `{names[2]}` must be 1-D of one length, "
                             f"got `{key}` of shape {tuple(x.shape)}")
    k1l, k0, eps = k1l.detach().cpu(), k0.detach().cpu(), eps.detach().cpu()
    for key, idx, kept in ((names[0], k1l, True), (names[1], k0, False)):
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"{where}: `{key}` must lie in [0, {n})")
        if idx.unique().numel() != idx.numel():
            raise ValueError(f"{where}: `{key}` must not repeat a point")
        if not bool((keep[idx] == kept).all()):
            raise ValueError(f"{where}: every point of `{key}` must be {'kept' if kept else 'dropped'} by `keep`")
    if not bool(((eps >= 0) & (eps <= 1)).all()):
        raise ValueError(f"{where}: `{names[2]}` must lie in [0, 1]")
    return k1l, k0, eps


def _pair_arrays(n, k1l, k0, eps):
    """The per-point ``partner`` (-1 outside K1L) and ``eps`` (0 outside K1L) of a plan's pairs, on
    the pairs' device."""
    partner = torch.full((n,), -1, dtype=torch.int32, device=k1l.device)
    ratio = torch.zeros(n, dtype=torch.float32, device=k1l.device)
    partner[k1l] = k0.int()
    ratio[k1l] = eps
    return partner, ratio


QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
HIST_BINS = 40


def stage_value_stats(values: torch.Tensor, keep: torch.Tensor, num_kept: int, order: torch.Tensor,
                      tracked: torch.Tensor, *, q=QUANTILES, bins: int = HIST_BINS) -> dict:
    """What a stage records about the values V (Eq. 12) it condensed by, for summary.json and the plots.

    ``values`` float [N] and ``keep`` bool [N] on one device, ``num_kept`` = keep.sum() (known to the
    host from the plan), ``order`` the plan's ranking (indices, best first), ``tracked`` the indices
    whose rank likelihood (Eq. 8) is followed across stages. Returns the mean value of the kept and
    of the dropped points (NaN for an empty set), their value quantiles ``q`` (linear interpolation,
    as ``torch.quantile``; [] for an empty set), a histogram of both over ``bins`` common bins on
    [0, max V] (a value on an edge goes to the bin above it, the maximum to the last: ``torch.histc``'s
    rule), and 1 - position / N of each tracked point.

    All of it is computed where the values are, in float64, and read back in ONE transfer: the old
    per-statistic host reads cost a stage end a dozen synchronisations on CUDA, and copying the
    values to the host for ``torch.quantile`` cost about 0.26 s at N = 1,281,167 on a 2-core CPU. The
    kept and the dropped values are sorted by one sort of V and a stable partition (prefix sums),
    so nothing waits for the device before the one read.
    """
    n = values.shape[0]
    dev = values.device
    n_kept, n_dropped = int(num_kept), n - int(num_kept)
    keep = keep.to(dev)
    # Kept values ascending in [0, n_kept), dropped ones ascending in [n_kept, n): a stable partition
    # of one sort (a dropped value at sorted position i has i - (kept up to i) dropped ones before it).
    sorted_v, by_value = torch.sort(values)
    kept_sorted = keep[by_value]
    kept_upto = torch.cumsum(kept_sorted, 0)
    dest = torch.where(kept_sorted, kept_upto - 1, torch.arange(n_kept, n_kept + n, device=dev) - kept_upto)
    part = torch.empty_like(sorted_v).scatter_(0, dest, sorted_v)

    def quantiles(lo: int, size: int) -> torch.Tensor:
        """``q`` of part[lo:lo + size] by torch.quantile's linear rule: rank q (size - 1), between its
        floor and ceiling (none for an empty set)."""
        ranks = [x * (size - 1) for x in q] if size else []
        ends = torch.tensor([lo + math.floor(r) for r in ranks] + [lo + math.ceil(r) for r in ranks],
                            dtype=torch.int64).to(dev, non_blocking=True)
        weight = torch.tensor([r - math.floor(r) for r in ranks], dtype=torch.float64).to(dev, non_blocking=True)
        pick = part[ends].double()
        return torch.lerp(pick[: len(ranks)], pick[len(ranks):], weight)

    sums = torch.stack([(values * keep).sum(dtype=torch.float64), (values * ~keep).sum(dtype=torch.float64)])
    means = sums / torch.tensor([max(n_kept, 1), max(n_dropped, 1)], dtype=torch.float64).to(dev, non_blocking=True)

    # histc's bins on [0, hi]: bin = floor(x * bins / hi), the maximum into the last bin.
    hi = values.max().double().clamp_min(1e-6) if n else torch.ones((), dtype=torch.float64, device=dev)
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64, device=dev) * hi
    which = (values.double() * bins / hi).floor().clamp_(0, bins - 1).long() + bins * (~keep).long()
    hist = torch.zeros(2 * bins, dtype=torch.int64, device=dev).index_add_(0, which, torch.ones_like(which))

    position = torch.empty(n, dtype=torch.int64, device=dev)
    position[order.to(dev)] = torch.arange(n, device=dev)
    p_rank = 1.0 - position[tracked.to(dev)].double() / n  # Eq. 8

    parts = [means, quantiles(0, n_kept), quantiles(n_kept, n_dropped), edges, hist.double(), p_rank]
    packed = torch.cat(parts).cpu().tolist()  # the one read
    ends = list(itertools.accumulate(p.numel() for p in parts))
    means_h, q_kept, q_dropped, edges_h, hist_h, p_rank_h = (
        packed[end - p.numel():end] for p, end in zip(parts, ends))
    return {"mean_kept": means_h[0] if n_kept else float("nan"),
            "mean_dropped": means_h[1] if n_dropped else float("nan"),
            "quantiles_kept": q_kept, "quantiles_dropped": q_dropped,
            "hist": {"edges": edges_h, "kept": hist_h[:bins], "dropped": hist_h[bins:]},
            "rank_likelihood": p_rank_h}


class KeptSampler(Sampler):
    """Samples the condensed set K^ of a :class:`KnowledgeCondenser`; its length changes per stage.

    * ``batch_size=None``: yields indices (use ``DataLoader(sampler=...)``).
      ``batch_size=B``: yields lists of B indices (use ``DataLoader(batch_sampler=...)``); with
      ``drop_last`` the final short batch is dropped.
    * DDP: rank r of W gets a disjoint share of a common shuffled order; the order is padded by
      repeating its head (or, with ``drop_last`` and no batch_size, cut) so every rank yields
      the same number of samples and steps the same number of batches.
    * Shuffles with its own generator seeded by (seed, epoch): call :meth:`set_epoch`. It never
      touches the global RNG and never patches DataLoader.
    """

    def __init__(self, condenser: KnowledgeCondenser, *, batch_size=None, shuffle=True, drop_last=False,
                 rank=0, world_size=1):
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, Integral)
                                       or batch_size < 1):
            raise ValueError(f"sampler: `batch_size` must be None or an int >= 1, got {batch_size!r}")
        for name, x in (("rank", rank), ("world_size", world_size)):
            if isinstance(x, bool) or not isinstance(x, Integral):
                raise TypeError(f"sampler: `{name}` must be an int, got {x!r}")
        if world_size < 1:
            raise ValueError(f"sampler: `world_size` must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"sampler: `rank` must lie in [0, world_size={world_size}), got {rank}")
        self.condenser = condenser
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _share_size(self, kept: int) -> int:
        if self.drop_last and self.batch_size is None:
            return kept // self.world_size
        return -(-kept // self.world_size)

    def indices(self) -> torch.Tensor:
        """This rank's indices for the current epoch, in yield order."""
        kept = self.condenser.kept_indices()
        if self.shuffle:
            g = torch.Generator().manual_seed(self.condenser.seed * 1_000_003 + 7919 * self.epoch + 1)
            kept = kept[torch.randperm(kept.numel(), generator=g)]
        share = self._share_size(kept.numel())
        total = share * self.world_size
        if total > kept.numel():
            reps = -(-total // max(kept.numel(), 1))
            kept = kept.repeat(reps)
        return kept[:total][self.rank::self.world_size]

    def __len__(self) -> int:
        share = self._share_size(self.condenser.kept_indices().numel())
        if self.batch_size is None:
            return share
        return share // self.batch_size if self.drop_last else -(-share // self.batch_size)

    def __iter__(self) -> Iterator:
        idx = self.indices()
        epoch = self.epoch
        if self.batch_size is None:
            count = 0
            try:
                for i in idx.tolist():
                    count += 1
                    yield i
            finally:
                self.condenser._note_yield(epoch, count)
        else:
            b = self.batch_size
            stop = (idx.numel() // b) * b if self.drop_last else idx.numel()
            for s in range(0, stop, b):
                batch = idx[s:s + b].tolist()
                self.condenser._note_yield(epoch, len(batch))
                yield batch


class KCDDataset(Dataset):
    """Wraps a map-style dataset of (x, y) into one of (x, y, index), with VAKS on the inputs.

    For a point of K1L with partner j and ratio ε (Eq. 14), it returns
    ``(1 - ε) x + ε x_j``, each transformed first, with the point's own label.
    It runs in the loader workers, so the GPU does no extra pass and the
    teacher sees the same mixed input as the student. Each stage mixes the original inputs, so the
    mixes do not compound (for the official code's persistent pixel mixing, see
    :meth:`KnowledgeCondenser.mix_buffer_`). ``mix=False`` returns
    plain (x, y, index) (the VAKS then lives elsewhere, e.g. in a soft-label buffer).
    """

    def __init__(self, dataset: Dataset, condenser: KnowledgeCondenser, mix: bool = True):
        n = len(dataset)
        if n != condenser.num_samples:
            raise ValueError(f"KCDDataset: the dataset has {n} samples but the condenser was made for "
                             f"num_samples={condenser.num_samples}")
        self.dataset = dataset
        self.mix = bool(mix)
        self.partner = condenser._partner_cpu   # shared memory: updated in place at each stage
        self.eps = condenser._eps_cpu

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x, y = self.dataset[index]
        if self.mix:
            j = int(self.partner[index])
            if j >= 0:
                e = float(self.eps[index])
                xj, _ = self.dataset[j]
                x = _mix_inputs(x, xj, e, index)
        return x, y, index


def _mix_inputs(x, xj, e: float, index: int):
    """``(1 - e) x + e xj`` (Eq. 14) of the same type and dtype as ``x``, so mixed and plain samples
    collate together: float inputs keep their dtype; integer ones (uint8 images) are mixed in fp32,
    rounded to nearest (ties to even, as :func:`ops.vaks_mix_` does) and clamped to their range."""
    if isinstance(x, torch.Tensor) and isinstance(xj, torch.Tensor):
        if x.dtype.is_floating_point:
            return (1.0 - e) * x + e * xj.to(x.dtype)
        if x.dtype != torch.bool:
            info = torch.iinfo(x.dtype)
            mixed = (1.0 - e) * x.float() + e * xj.float()
            return mixed.round().clamp(info.min, info.max).to(x.dtype)
    elif isinstance(x, np.ndarray) and isinstance(xj, np.ndarray):
        if np.issubdtype(x.dtype, np.floating):
            return ((1.0 - e) * x + e * xj).astype(x.dtype, copy=False)
        if np.issubdtype(x.dtype, np.integer):
            info = np.iinfo(x.dtype)
            mixed = (1.0 - e) * x.astype(np.float32) + e * xj.astype(np.float32)
            return np.clip(np.rint(mixed), info.min, info.max).astype(x.dtype)
    raise TypeError(f"KCDDataset: VAKS mixes inputs that are tensors or numpy arrays of numbers, but sample "
                    f"{index} is {type(x).__name__} and its partner {type(xj).__name__}; give the wrapped "
                    f"dataset a transform that returns tensors (e.g. ToTensor), or use mix=False")
