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
once per stage (or once per epoch, and then only on the host). The sampler and the dataset wrapper
live in :mod:`kcd_fast.sampling`, the statistics each stage records in :mod:`kcd_fast.stage_stats`,
the checks of a saved state in :mod:`kcd_fast.condenser_state` and the DDP merge in
:mod:`kcd_fast.rank_merge`.
"""
from __future__ import annotations

import os
import weakref

import torch
import torch.distributed as dist

from kcd_fast import official, ops
from kcd_fast import reference as R
from kcd_fast.checks import check_choice, check_flag, check_int, check_real, check_temperature, check_tensor
from kcd_fast.condenser_state import CONDENSED_KIND, STATE_VERSION, checked_state, pair_arrays, read_condensed
from kcd_fast.rank_merge import merge_ranks_
from kcd_fast.sampling import KeptSampler
from kcd_fast.stage_stats import stage_value_stats

__all__ = ["KnowledgeCondenser", "measured_cost"]

_SCHEDULES = ("exp", "linear")
_SELECTIONS = ("kcd", "random")
PROTOCOLS = ("paper", "official")
# What protocol="official" decides itself (its record, schedule, pairs and eps), at their defaults.
_OFFICIAL_FIXED = {"schedule": "exp", "k0": "dropped", "online_recording": True, "adaptive_eps": True}
TRAJECTORY_POINTS = 256  # points whose rank likelihood (Eq. 8) is recorded at each stage, for Fig. 3(b)
_OP = "KnowledgeCondenser"


def measured_cost(samples_passed: int, num_samples: int, epochs: int, world_size: int = 1) -> float:
    """The measured relative cost C: the samples a run passed on to training, C_a (all ranks together),
    over what ``epochs`` full epochs pass on ``world_size`` ranks, ceil(N / W) * W each (the padding of
    ``DistributedSampler``), so that the full-set KD baseline (``--no-kcd``) is exactly 1 on any
    number of ranks. NaN when ``epochs`` is 0. Eq. 16 is its prediction from the schedule."""
    op = "measured_cost"
    samples_passed = check_int(op, "samples_passed", samples_passed, 0)
    num_samples = check_int(op, "num_samples", num_samples, 1)
    epochs = check_int(op, "epochs", epochs, 0)
    world_size = check_int(op, "world_size", world_size, 1)
    full = -(-num_samples // world_size) * world_size * epochs
    return samples_passed / full if full else float("nan")


class KnowledgeCondenser:
    """The knowledge space of KCD and its EM stage loop (Alg. 1).

    Args:
        num_samples: N, the size of the training set (the knowledge space K).
        epochs: I, the number of training epochs.
        stage_epochs: T, the epochs of one stage; must divide ``epochs``.
        rho: ρ, the final kept fraction, in (0, 1].
        alpha: α of the cost-aware ranking (Eq. 13); 0 is the "w/o CAR" ablation.
        eps_max: ε_m of Eq. 15, in (0, 1].
        schedule: ``"exp"`` (the paper, τ^t = ρ^((t+1)/S)) or ``"linear"`` (τ^t falls linearly to ρ).
        k0: ``"dropped"``, ``"all"`` (paper text) or ``"window"``; see :func:`kcd_fast.ops.condense`.
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
        protocol: ``"paper"`` (Alg. 1 as the paper states it; the options above) or ``"official"``
            (the official code's selection, :mod:`kcd_fast.official`: its record, schedule, drop
            size, K0 window and eps; ``schedule``, ``k0``, ``online_recording`` and ``adaptive_eps``
            must stay at their defaults, and it runs in one process, as the official code does).

    State (all O(N) on ``device``, see :meth:`bytes_per_sample`): ``values`` (V^F),
    ``counts`` (F), ``keep`` (the condensed set), ``partner`` and ``eps`` (the VAKS pair of
    each K1L point; -1 and 0 elsewhere). ``host_partner`` and ``host_eps`` are host copies of the
    last two in shared memory, which :class:`~kcd_fast.KCDDataset` reads in the loader workers.
    """

    def __init__(self, num_samples: int, *, epochs: int, stage_epochs: int, rho: float = 0.7,
                 alpha: float = 0.03, eps_max: float = 0.3, schedule: str = "exp", k0: str = "dropped",
                 selection: str = "kcd", online_recording: bool = True, vaks: bool = True,
                 adaptive_eps: bool = True, temperature: float = 1.0, device: torch.device | str = "cpu",
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, protocol: str = "paper"):
        self.num_samples = check_int(_OP, "num_samples", num_samples, 1)
        self.epochs = check_int(_OP, "epochs", epochs, 1)
        self.stage_epochs = check_int(_OP, "stage_epochs", stage_epochs, 1)
        if self.stage_epochs > self.epochs:
            raise ValueError(f"KnowledgeCondenser: `stage_epochs` ({stage_epochs}) must not exceed "
                             f"`epochs` ({epochs})")
        if self.epochs % self.stage_epochs:
            raise ValueError(f"KnowledgeCondenser: `stage_epochs` ({stage_epochs}) must divide `epochs` "
                             f"({epochs}) into whole stages")
        self.rho = check_real(_OP, "rho", rho, lo=0.0, hi=1.0, lo_open=True)
        self.eps_max = check_real(_OP, "eps_max", eps_max, lo=0.0, hi=1.0, lo_open=True)
        self.alpha = check_real(_OP, "alpha", alpha, lo=0.0)
        # The rule update_values applies at every observe (1/T a finite float32), checked once here.
        self.temperature = check_temperature(_OP, temperature)
        self.schedule = check_choice(_OP, "schedule", schedule, _SCHEDULES)
        self.k0 = check_choice(_OP, "k0", k0, ops.K0_POLICIES)
        self.selection = check_choice(_OP, "selection", selection, _SELECTIONS)
        self.online_recording = check_flag(_OP, "online_recording", online_recording)
        self.vaks = check_flag(_OP, "vaks", vaks)
        self.adaptive_eps = check_flag(_OP, "adaptive_eps", adaptive_eps)
        self.seed = check_int(_OP, "seed", seed, 0)
        self.device = torch.device(device)
        self._set_world(rank, world_size)
        self.protocol = check_choice(_OP, "protocol", protocol, PROTOCOLS)
        if self.protocol == "official":
            self._check_official()
        self.num_stages = self.epochs // self.stage_epochs
        smallest = min(self.num_kept(t) for t in range(self.num_stages))
        if smallest < 1:
            raise ValueError(f"KnowledgeCondenser: `num_samples`={self.num_samples} with `rho`={self.rho} keeps "
                             f"{smallest} points at the last stage (floor(tau^t N), Eq. 8); every stage must keep "
                             f"at least one: raise rho or num_samples")
        self._make_state()

    def _check_official(self) -> None:
        set_here = [f"{k}={getattr(self, k)!r}" for k, v in _OFFICIAL_FIXED.items() if getattr(self, k) != v]
        if set_here:
            raise ValueError(f"KnowledgeCondenser: protocol='official' makes its own record, schedule, pairs and eps; "
                             f"leave {', '.join(set_here)} at their defaults")
        if self.world_size > 1:
            raise ValueError("KnowledgeCondenser: protocol='official' runs in one process, as the official code "
                             f"does; got world_size={self.world_size}")

    def _set_world(self, rank, world_size) -> None:
        """The DDP position, from the arguments or else the process group (rank 0 of 1 without one)."""
        rank = None if rank is None else check_int(_OP, "rank", rank, 0)
        world_size = None if world_size is None else check_int(_OP, "world_size", world_size, 1)
        self._world_from_group = world_size is None  # taken from the process group (or 1 without one)
        group = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else dist.get_rank() if group else 0
        self.world_size = world_size if world_size is not None else dist.get_world_size() if group else 1
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"KnowledgeCondenser: `rank` must lie in [0, world_size={self.world_size}), "
                             f"got {self.rank}")
        if self.world_size > 1 and not group:
            raise ValueError(f"KnowledgeCondenser: world_size={self.world_size} needs an initialised "
                             f"torch.distributed process group (the ranks' records are merged at each stage end); "
                             f"for samplers of other ranks without one, use sampler(rank=..., world_size=...)")

    def _make_state(self) -> None:
        """The per-sample state of a run that has not started: every point kept, none paired."""
        n, dev = self.num_samples, self.device
        self.values = torch.zeros(n, dtype=torch.float32, device=dev)
        self.device = dev = self.values.device  # "cuda" -> "cuda:<current>", fixed from here on
        self.counts = torch.zeros(n, dtype=torch.int32, device=dev)
        self.keep = torch.ones(n, dtype=torch.bool, device=dev)
        self.partner = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.eps = torch.zeros(n, dtype=torch.float32, device=dev)
        # The "w/o OVR" ablation ranks by the last visit's entropy.
        self.last_values = None if self.online_recording else torch.zeros(n, dtype=torch.float32, device=dev)
        # protocol="official": this epoch's entropies (-1: not visited), the sum of the positive ones of
        # every epoch (float64) and their count, and the epochs folded into them.
        self.official_record = None
        if self.protocol == "official":
            self.official_record = {"epoch_entropy": torch.full((n,), -1.0, device=dev),
                                    "sum": torch.zeros(n, dtype=torch.float64, device=dev),
                                    "count": torch.zeros(n, dtype=torch.int32, device=dev), "epochs": 0}
        # DDP: the state at the last merge, to send only this stage's deltas.
        self._synced = None
        if self.world_size > 1:
            self._synced = (self.values.clone(), self.counts.clone(),
                            None if self.last_values is None else self.last_values.clone())
        # Host copies for the samplers and the loader workers (shared memory: workers see updates).
        self._kept_cpu = torch.arange(n, dtype=torch.int64)
        self.host_partner = torch.full((n,), -1, dtype=torch.int32).share_memory_()
        self.host_eps = torch.zeros(n, dtype=torch.float32).share_memory_()
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
        if self.official_record is not None:
            device += 4 + 8 + 4
        return {"device": device, "host": 8 + 4 + 4}  # kept index list (at most), partner, eps

    def kept_indices(self) -> torch.Tensor:
        """The condensed set K^ as ascending int64 indices, on the host."""
        return self._kept_cpu

    def tau(self, stage: int) -> float:
        """τ^t of the schedule (the kept fraction after condensation t)."""
        if self.protocol == "official":
            return self.num_kept(stage) / self.num_samples
        return R.tau(stage, self.rho, self.num_stages, self.schedule)

    def num_kept(self, stage: int) -> int:
        """|K1| at stage t."""
        if self.protocol == "official":
            kept = self.num_samples
            for _ in range(stage + 1):
                kept = official.kept_count(self.num_samples, self.rho, kept)
            return kept
        return R.num_kept(self.num_samples, stage, self.rho, self.num_stages, self.schedule)

    def is_boundary(self, epoch: int) -> bool:
        """Alg. 1 line 8: condensation at the end of epoch i when i % T == 0; with protocol="official",
        when the 1-based epoch i + 1 is a multiple of T (the last epoch too)."""
        if self.protocol == "official":
            return (epoch + 1) % self.stage_epochs == 0
        return epoch % self.stage_epochs == 0

    def stage_before(self, epoch: int) -> int:
        """The last stage condensed before ``epoch`` begins (-1: none yet)."""
        if self.protocol == "official":
            return min(epoch // self.stage_epochs, self.num_stages) - 1
        return -1 if epoch == 0 else min((epoch - 1) // self.stage_epochs, self.num_stages - 1)

    def planned_samples(self, epoch: int) -> int:
        """Samples the schedule plans for ``epoch`` (all ranks together, before DDP padding)."""
        stage = self.stage_before(epoch)
        return self.num_samples if stage < 0 else self.num_kept(stage)

    def predicted_cost(self) -> dict:
        """C predicted from the schedule: by Eq. 16, and by the exact per-epoch counts. A frozen set
        (:meth:`load_condensed`) trains on its kept points every epoch: ``schedule`` is then its kept
        fraction (from the first epoch on), and Eq. 16, which describes a schedule, is None."""
        if self.frozen:
            return {"eq16": None, "schedule": int(self._kept_cpu.numel()) / self.num_samples}
        taus = [self.tau(t) for t in range(self.num_stages)]
        planned = sum(self.planned_samples(e) for e in range(self.epochs))
        # Eq. 16 describes the paper's schedule; the official one trains T epochs on every sample first.
        eq16 = R.relative_cost(taus, self.stage_epochs, self.epochs) if self.protocol == "paper" else None
        return {"eq16": eq16, "schedule": planned / (self.num_samples * self.epochs)}

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
        return {"epochs": len(epochs), "C_a": passed,
                "C": measured_cost(passed, self.num_samples, len(epochs), self.world_size),
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
            ops.record_last_visit_(self.last_values, indices, entropy)
        if self.official_record is not None:  # one entropy per sample and epoch: the last visit's
            ops.record_last_visit_(self.official_record["epoch_entropy"], indices, entropy)
        return entropy

    def count_yielded(self, epoch: int, count: int) -> None:
        """Count ``count`` samples passed on to training in epoch ``epoch`` by this rank, for
        :meth:`measured_cost`. The samplers of :meth:`sampler` call it as they yield; a loop that
        batches :meth:`kept_indices` itself calls it per batch."""
        epoch = check_int("count_yielded", "epoch", epoch, 0)
        count = check_int("count_yielded", "count", count, 0)
        self.samples_yielded[epoch] = self.samples_yielded.get(epoch, 0) + count

    # ------------------------------------------------------------------ E-step: per stage

    def end_epoch(self, epoch: int) -> ops.CondensePlan | None:
        """Close epoch ``epoch`` (0-based). At a stage boundary (epoch % T == 0), condense.

        Returns the new plan, or None when the epoch is not a boundary. Every DDP
        rank must call this every epoch; at a boundary it runs ONE collective.
        If it raises, the epoch stays open (``next_epoch``, the plan and the history are unchanged)
        and can be ended again; a DDP merge that already ran is kept (it changes no record).
        """
        epoch = check_int("end_epoch", "epoch", epoch)
        if epoch != self.next_epoch:
            raise ValueError(f"end_epoch: expected epoch {self.next_epoch}, got {epoch}; call it once per epoch, "
                             f"in order (after a resume, load the checkpoint's state_dict first)")
        if epoch >= self.epochs:
            raise ValueError(f"end_epoch: epoch {epoch} is past the last epoch ({self.epochs - 1})")
        self._check_world("end_epoch")
        record = self.official_record
        if record is not None and record["epochs"] == epoch:  # once, also when a stage end raised before
            official.fold_epoch_(record["sum"], record["count"], record["epoch_entropy"])
            record["epochs"] = epoch + 1
        plan = None
        if not self.frozen and self.is_boundary(epoch):
            flagged = self._merge_ranks()  # under DDP, with every rank's error flag
            # Out-of-range indices the CUDA kernel skipped this stage, on this rank or another: every
            # rank raises together (a rank raising alone would leave the others in a collective).
            ops.check_errors(self.device)
            if flagged:
                raise ops.out_of_range_error("another rank")
            plan = self._condense(self.stage_before(epoch + 1), epoch)
        # Only now that the stage end succeeded does the epoch close.
        self.samples_yielded.setdefault(epoch, 0)
        self.next_epoch = epoch + 1
        return plan

    def _merge_ranks(self) -> int:
        """One all_reduce of the deltas since the last merge (:func:`kcd_fast.rank_merge.merge_ranks_`):
        every rank then holds the single-process state. It runs at each stage end and in
        :meth:`state_dict`; merging early only moves the sync point. Returns how many OTHER ranks have
        their out-of-range flag raised (0 in one process)."""
        if self.world_size == 1:
            return 0
        self._synced, others = merge_ranks_(self.values, self.counts, self.last_values, self._synced)
        return others

    def _condense(self, stage: int, epoch: int) -> ops.CondensePlan:
        values = self.values if self.last_values is None else self.last_values
        order = None
        if self.official_record is not None:  # ranked by the official record, in float64
            record = self.official_record
            order = official.ranking(official.scores(record["sum"], record["count"], self.alpha))
            values = (record["sum"] / record["count"].clamp_min(1)).float()  # V, for the stage's statistics
        if self.selection == "random":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + stage)
            order = torch.randperm(self.num_samples, generator=g).to(self.device)
        plan = ops.condense(values, self.counts, keep=self.num_kept(stage), alpha=self.alpha,
                            eps_max=self.eps_max, previous_keep=self.keep,
                            k0="window" if self.protocol == "official" else self.k0,
                            adaptive_eps=self.adaptive_eps, order=order)
        if self.protocol == "official":
            plan = self._official_pairs(plan)
        if not self.vaks:
            empty = plan.k1l[:0]
            plan = ops.CondensePlan(plan.keep, plan.order, empty, empty, plan.eps[:0], plan.num_kept, plan.num_k0)
        summary = self._summary(plan, stage, epoch, values)
        self._apply(plan.keep, plan.k1l, plan.k0, plan.eps)
        self.stage = stage
        self.history.append(summary)
        return plan

    def _official_pairs(self, plan: ops.CondensePlan) -> ops.CondensePlan:
        """The official eps of the window's pairs; an empty window (the count at its floor) makes no
        pairs, where the official code raises IndexError."""
        pairs = plan.k1l.numel()
        if not pairs and self.vaks:
            official.warn_once("the kept count is at its floor, so the K0 window is empty: this stage mixes no "
                               "pairs (the official code raises IndexError here)")
        eps = official.pair_eps(pairs, self.eps_max).to(self.device)
        return ops.CondensePlan(plan.keep, plan.order, plan.k1l, plan.k0, eps, plan.num_kept, plan.num_k0)

    def _apply(self, keep, k1l, k0, eps) -> None:
        """Make (keep, K1L, K0, eps) the condensed set, with the per-point partner and eps they imply."""
        partner, ratio = pair_arrays(self.num_samples, k1l, k0, eps)
        self.keep.copy_(keep)
        self.partner.copy_(partner)
        self.eps.copy_(ratio)
        self.pairs = (k1l, k0, eps)
        self._kept_cpu = keep.nonzero().flatten().cpu()
        self.host_partner.copy_(partner.cpu())
        self.host_eps.copy_(ratio.cpu())

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

        Persistent: call it once after each condensation, and the mixes compound across stages, as
        the official code's pixel mixing does (uint8 rows round to nearest here; the official code
        truncates: :func:`kcd_fast.official.mix_pixels_`).
        """
        check_tensor("mix_buffer_", "buffer", buffer)
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

    def config(self) -> dict:
        """The configuration, as a state_dict and a condensed-set file record it (and their loaders compare).
        ``protocol`` is recorded where it is not "paper", so paper-protocol states keep kcd_fast 0.1.0's form."""
        config = {k: getattr(self, k) for k in (
            "num_samples", "epochs", "stage_epochs", "rho", "alpha", "eps_max", "schedule", "k0", "selection",
            "online_recording", "vaks", "adaptive_eps", "temperature", "seed")}
        if self.protocol != "paper":
            config["protocol"] = self.protocol
        return config

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
            "version": STATE_VERSION, "config": self.config(),
            "values": host(self.values), "counts": host(self.counts), "keep": host(self.keep),
            "partner": host(self.partner), "eps": host(self.eps),
            "pairs": tuple(host(t) for t in self.pairs),
            "last_values": host(self.last_values),
            "synced": None if self._synced is None else tuple(host(t) for t in self._synced),
            "next_epoch": self.next_epoch, "stage": self.stage, "frozen": self.frozen,
            "loaded": self._loaded, "loaded_stage": self._loaded_stage,
            "samples_yielded": dict(self.samples_yielded),
            "history": list(self.history),
            **({} if self.official_record is None else {"official_record": {
                k: host(v) if isinstance(v, torch.Tensor) else v for k, v in self.official_record.items()}}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. Refuses a state of another version, N or configuration.

        Every key is checked (type, dtype, shape, range, finiteness, consistency of the pairs)
        before anything changes: a refused state leaves the condenser as it was.
        """
        self._commit_state(checked_state(self, state))

    def _commit_state(self, c: dict) -> None:
        """Make a checked state (:func:`~kcd_fast.condenser_state.checked_state`) this condenser's:
        device tensors first, then the assignments, none of which can fail."""
        dev = self.device
        new_pairs = tuple(t.to(dev, copy=True) for t in c["pairs"])
        new_synced = None
        if self.world_size > 1:
            new_synced = tuple(None if t is None else t.to(dev, copy=True) for t in c["synced"])
        self.values.copy_(c["values"])
        self.counts.copy_(c["counts"])
        self._apply(c["keep"].to(dev), *new_pairs)  # partner and eps: checked to be the ones the pairs imply
        if self.last_values is not None:
            self.last_values.copy_(c["last_values"])
        if self.official_record is not None:
            for key in ("epoch_entropy", "sum", "count"):
                self.official_record[key].copy_(c["official_record"][key])
            self.official_record["epochs"] = c["official_record"]["epochs"]
        if self.world_size > 1:
            self._synced = new_synced
        self.next_epoch, self.stage, self.frozen = c["next_epoch"], c["stage"], c["frozen"]
        self._loaded, self._loaded_stage = c["loaded"], c["loaded_stage"]
        self.samples_yielded = c["samples_yielded"]
        self.history = c["history"]

    def save_condensed(self, path: str | os.PathLike) -> None:
        """Export the condensed knowledge K^ (the keep mask and the VAKS pairs) to reuse it (Fig. 4)."""
        k1l, k0, eps = self.pairs
        stage, tau = self.stage, self.tau(self.stage) if self.stage >= 0 else 1.0
        if self.frozen and self._loaded_stage is not None:  # the loaded set, as its file described it
            stage, tau = self._loaded_stage
        torch.save({"kind": CONDENSED_KIND, "version": STATE_VERSION, "num_samples": self.num_samples,
                    "stage": stage, "tau": tau,
                    "keep": self.keep.cpu(), "k1l": k1l.cpu(), "k0": k0.cpu(), "eps": eps.cpu(),
                    "config": self.config()}, path)

    def load_condensed(self, path: str | os.PathLike, freeze: bool = True) -> ops.CondensePlan:
        """Use condensed knowledge saved by :meth:`save_condensed` (e.g. to re-distil from scratch on K^).

        With ``freeze``, no further condensation happens: every epoch trains on the loaded set.
        The file is checked in full (keys, dtypes, shapes, index ranges, the pairs of Eq. 14)
        before anything changes.
        """
        keep, k1l, k0, eps, stage_tau = read_condensed(path, self.num_samples)
        dev = self.device
        keep = keep.to(dev)
        order = torch.cat([keep.nonzero().flatten(), (~keep).nonzero().flatten()])
        plan = ops.CondensePlan(keep, order, k1l.to(dev), k0.to(dev), eps.to(dev), int(keep.sum()), int(k0.numel()))
        self._apply(plan.keep, plan.k1l, plan.k0, plan.eps)
        self.frozen, self._loaded = bool(freeze), True
        self._loaded_stage = stage_tau
        return plan
