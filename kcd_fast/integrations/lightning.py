"""Knowledge Condensation Distillation in a Lightning 2.x run: ``KCDCallback``.

::

    from kcd_fast.integrations.lightning import KCDCallback

    kcd = KCDCallback(len(train_set), stage_epochs=40)            # epochs: the Trainer's max_epochs
    loader = DataLoader(kcd.dataset(train_set), batch_size=64, sampler=kcd.sampler(), drop_last=True)
    trainer = lightning.Trainer(max_epochs=240, callbacks=[kcd])
    trainer.fit(student, loader)     # training_step returns {"loss": loss, "logits": student_logits}

Hook by hook:

* ``setup``: makes the :class:`~kcd_fast.KnowledgeCondenser` on the trainer's device, with the
  trainer's global rank and world size (under DDP the process group exists by then).
* ``on_train_batch_end``: ``condenser.observe(indices, logits)``, the entropy of each row (Eq. 7)
  into the running mean V of its sample (Eq. 12): one fused kernel, no host sync; and the batch's
  rows counted for the measured C.
* ``on_train_epoch_end``: ``condenser.end_epoch(epoch)``; at a stage end it ranks the whole set by
  V·F^α (Eq. 13), keeps the top τ^t and pairs K1L with K0 (VAKS, Eq. 14-15), with ONE collective
  under DDP. Then it logs C, the kept fraction and the stage through ``pl_module.log``.
* ``state_dict`` / ``load_state_dict``: the condenser's state, in Lightning's checkpoints.

The condensed set reaches training through a sampler the callback owns (:class:`KCDSampler`): it
reads the condenser's kept set at every epoch and gives this rank its share of it, as
:meth:`KnowledgeCondenser.sampler` does. It is a ``DistributedSampler`` by type, so that Lightning's
``use_distributed_sampler`` leaves it in place under DDP instead of wrapping it. The callback sets
``Trainer.reload_dataloaders_every_n_epochs`` to 1, so that Lightning re-measures the shrinking
epoch (its batch count, its end-of-epoch validation) every epoch.

Lightning is imported when ``KCDCallback`` is first looked up, not with this module.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from numbers import Integral

import torch
from torch.utils.data import DistributedSampler

from kcd_fast.checks import INDEX_DTYPES, LOGIT_DTYPES, check_flag, check_int
from kcd_fast.condenser import KnowledgeCondenser
from kcd_fast.sampling import KCDDataset, KeptSampler

__all__ = ["KCDCallback", "KCDHooks", "KCDSampler", "KeptSet", "batch_indices", "step_logits", "check_step"]

_OP = "KCDCallback"
# KnowledgeCondenser options the callback passes on; rank, world size and device come from the Trainer.
CONDENSER_OPTIONS = ("rho", "alpha", "eps_max", "schedule", "k0", "selection", "online_recording", "vaks",
                     "adaptive_eps", "temperature", "seed", "protocol")
FROM_TRAINER = ("rank", "world_size", "device")
STATE_FORMAT = 1
INSTALL_HINT = "pip install kcd_fast[lightning] (or pip install lightning)"


def describe(value) -> str:
    """A short description of a batch or of training_step's outputs, for error messages."""
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return "None" if value is None else f"a {type(value).__name__}"


def _check_spec(name: str, spec, allow_position: bool):
    """A place to find the indices or logits: a key, a position (indices only) or a callable."""
    if spec is None and allow_position:
        return spec
    if callable(spec) or isinstance(spec, str):
        return spec
    if allow_position and isinstance(spec, Integral) and not isinstance(spec, bool):
        return int(spec)
    kinds = "None, a key, a position or a callable" if allow_position else "a key or a callable"
    raise TypeError(f"{_OP}: `{name}` must be {kinds} (pl_module, outputs, batch) -> tensor, got {spec!r}")


def batch_indices(spec, pl_module, outputs, batch):
    """The dataset indices of a training batch, where ``spec`` (the callback's ``indices``) says.

    ``None``: ``batch["index"]`` of a dict batch, ``batch[-1]`` of a tuple or list of three or more
    (``(x, y, index)``, as :class:`~kcd_fast.KCDDataset` returns); a 2-tuple is taken for ``(x, y)``,
    without indices. A str: that key of a dict batch. An int: that position of a tuple or list.
    A callable: ``spec(pl_module, outputs, batch)``.
    """
    if callable(spec):
        return spec(pl_module, outputs, batch)
    how = ("return each sample's dataset index from the dataset (callback.dataset(train_set) returns "
           "(x, y, index)), or say where it is: indices='<key>', indices=<position> or "
           "indices=<callable(pl_module, outputs, batch)>")
    if spec is None:
        if isinstance(batch, Mapping) and "index" in batch:
            return batch["index"]
        if isinstance(batch, (list, tuple)) and len(batch) >= 3:
            return batch[-1]
        raise ValueError(f"{_OP}: `indices` is not given and the batch is {describe(batch)}, which carries no "
                         f"dataset indices where the default looks (batch['index'] of a dict, batch[-1] of a "
                         f"tuple of three or more); {how}")
    if isinstance(spec, str):
        if isinstance(batch, Mapping) and spec in batch:
            return batch[spec]
        raise ValueError(f"{_OP}: `indices`={spec!r} names a key of a dict batch, but the batch is "
                         f"{describe(batch)}; {how}")
    if isinstance(batch, (list, tuple)) and -len(batch) <= spec < len(batch):
        return batch[spec]
    raise ValueError(f"{_OP}: `indices`={spec} names a position in a tuple batch, but the batch is "
                     f"{describe(batch)}; {how}")


def step_logits(spec, pl_module, outputs, batch):
    """The student's logits of a training batch, where ``spec`` (the callback's ``logits``) says.

    A str: that key of training_step's outputs when they are a dict holding it, else that attribute
    of the LightningModule (set in training_step, e.g. ``self.logits = logits``). A callable:
    ``spec(pl_module, outputs, batch)``.
    """
    if callable(spec):
        return spec(pl_module, outputs, batch)
    if isinstance(outputs, Mapping) and spec in outputs:
        return outputs[spec]
    value = getattr(pl_module, spec, None)
    if value is not None:
        return value
    raise ValueError(f"{_OP}: `logits`={spec!r} is neither a key of training_step's outputs ({describe(outputs)}) "
                     f"nor an attribute of {type(pl_module).__name__}; return {{'loss': loss, {spec!r}: logits}} "
                     f"from training_step, keep them as self.{spec}, or pass logits='<key>' or "
                     f"logits=<callable(pl_module, outputs, batch)>")


def check_step(indices, logits) -> None:
    """Indices int32/int64 [B] and logits fp32/fp16/bf16 [B, C]: shapes and dtypes only (no host sync)."""
    if not isinstance(indices, torch.Tensor) or indices.dtype not in INDEX_DTYPES:
        got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise TypeError(f"{_OP}: `indices` must give an int32 or int64 tensor of dataset indices, got {got}")
    if indices.dim() != 1:
        raise ValueError(f"{_OP}: `indices` must give a 1-D tensor [B], got shape {tuple(indices.shape)}")
    if not isinstance(logits, torch.Tensor) or logits.dtype not in LOGIT_DTYPES:
        got = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"{_OP}: `logits` must give a float32, float16 or bfloat16 tensor, got {got}")
    if logits.dim() != 2 or logits.shape[0] != indices.shape[0]:
        raise ValueError(f"{_OP}: `logits` must give one row per index, [B={indices.shape[0]}, C], got shape "
                         f"{tuple(logits.shape)}; `indices` and `logits` must describe the same samples")


class KeptSet:
    """What :class:`~kcd_fast.KeptSampler` reads of a condenser (the kept set, the seed), without its
    count of yielded samples: the callback counts the rows of each batch it observes instead, which
    is what training saw whatever the loader dropped (``drop_last``) or Lightning left unread."""

    def __init__(self, condenser: KnowledgeCondenser):
        self.condenser, self.seed = condenser, condenser.seed

    def kept_indices(self) -> torch.Tensor:
        return self.condenser.kept_indices()

    def count_yielded(self, epoch: int, count: int) -> None:
        """Not counted here (see the class)."""


class KCDSampler(DistributedSampler):
    """Samples the callback's condensed set K^: this rank's share of it, re-read at every epoch.

    It is a :class:`~kcd_fast.KeptSampler` of the condenser (disjoint, equal shares per rank;
    shuffled by (seed, epoch), never by the global RNG; the order of :meth:`KnowledgeCondenser.sampler`),
    made on first use once the Trainer has set the callback up. It is a ``DistributedSampler`` by type
    only, so that Lightning's ``use_distributed_sampler`` keeps it instead of sharding the shares
    again; ``DistributedSampler.__init__`` is not run (it needs the process group, which the Trainer
    starts later).
    """

    def __init__(self, callback, *, shuffle: bool = True, drop_last: bool = False):  # no super().__init__
        self.callback = callback
        self.shuffle = check_flag("KCDCallback.sampler", "shuffle", shuffle)
        self.drop_last = check_flag("KCDCallback.sampler", "drop_last", drop_last)
        self.epoch = 0
        self.kept_sampler, self._condenser = None, None  # made on first use, for the condenser of that time

    def _current(self) -> KeptSampler:
        condenser = self.callback.condenser
        if condenser is None:
            raise RuntimeError(f"{_OP}.sampler(): the condenser is made when the Trainer sets the callback up; "
                               f"add the callback to Trainer(callbacks=[...]) and iterate this loader in trainer.fit")
        if self._condenser is not condenser:
            self.kept_sampler = KeptSampler(KeptSet(condenser), shuffle=self.shuffle, drop_last=self.drop_last,
                                            rank=condenser.rank, world_size=condenser.world_size)
            self._condenser = condenser
        self.kept_sampler.set_epoch(self.epoch)
        return self.kept_sampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())

    # What a DistributedSampler exposes, for code that reads it.
    @property
    def num_replicas(self) -> int:
        return self._current().world_size

    @property
    def rank(self) -> int:
        return self._current().rank

    @property
    def seed(self) -> int:
        return self._current().condenser.seed

    @property
    def num_samples(self) -> int:
        return len(self)

    @property
    def total_size(self) -> int:
        return len(self) * self.num_replicas


class KCDHooks:
    """KCD in a Lightning run: record each step, condense at stage ends, sample the condensed set.

    ``KCDCallback`` is this class with Lightning's ``Callback`` as its second base.

    Args:
        num_samples: N, the size of the training set (``len(train_set)``).
        stage_epochs: T, the epochs of one stage (Alg. 1).
        epochs: I, the epochs of the whole schedule; default the Trainer's ``max_epochs``. A Trainer
            may stop before I (then resume to go on), never run past it.
        indices: where a batch carries its dataset indices: None (``batch["index"]`` of a dict,
            ``batch[-1]`` of a tuple of three or more), a key, a position, or a callable
            ``(pl_module, outputs, batch) -> tensor``.
        logits: where the student's logits are: a key of training_step's outputs (a dict), else an
            attribute of the LightningModule of that name; or a callable as for ``indices``.
        buffers: [N, ...] tensors (uint8 images, soft labels) or objects with ``mix_(k1l, k0, eps)``
            (a :class:`~kcd_fast.KnowledgeBuffer`) that VAKS mixes in place at each stage end
            (Eq. 14, :meth:`KnowledgeCondenser.mix_buffer_`). Not saved in checkpoints.
        reload_dataloaders: set ``Trainer.reload_dataloaders_every_n_epochs`` to 1 where it is 0.
        check_sampler: refuse a training DataLoader that does not sample with :meth:`sampler`.
        log: log ``C``, ``kept_fraction`` and ``stage`` (under ``log_prefix``) at each epoch end.
        **options: the :class:`~kcd_fast.KnowledgeCondenser` options (``rho``, ``alpha``,
            ``eps_max``, ``schedule``, ``seed``, ...); rank, world size and device come from the Trainer.
    """

    def __init__(self, num_samples: int, *, stage_epochs: int, epochs: int | None = None, indices=None,
                 logits="logits", buffers=(), reload_dataloaders: bool = True, check_sampler: bool = True,
                 log: bool = True, log_prefix: str = "kcd/", **options):
        self.num_samples = check_int(_OP, "num_samples", num_samples, 1)
        self.stage_epochs = check_int(_OP, "stage_epochs", stage_epochs, 1)
        self.epochs = None if epochs is None else check_int(_OP, "epochs", epochs, 1)
        self.indices = _check_spec("indices", indices, allow_position=True)
        self.logits = _check_spec("logits", logits, allow_position=False)
        self.buffers = self._checked_buffers(buffers)
        self.reload_dataloaders = check_flag(_OP, "reload_dataloaders", reload_dataloaders)
        self.check_sampler = check_flag(_OP, "check_sampler", check_sampler)
        self.log = check_flag(_OP, "log", log)
        self.log_prefix = str(log_prefix)
        self.options = self._checked_options(options)
        self.condenser = None        # made in setup(), on the trainer's device, rank and world size
        self._pending_state = None   # a state loaded before setup, applied there
        # The VAKS pairs that callback.dataset() reads, in shared memory so that loader workers see each stage's.
        self.host_partner = torch.full((self.num_samples,), -1, dtype=torch.int32).share_memory_()
        self.host_eps = torch.zeros(self.num_samples, dtype=torch.float32).share_memory_()

    def _checked_options(self, options: dict) -> dict:
        from_trainer = sorted(set(options) & set(FROM_TRAINER))
        if from_trainer:
            raise TypeError(f"{_OP}: {', '.join(f'`{k}`' for k in from_trainer)} come from the Trainer "
                            f"(its global rank, world size and root device); leave them out")
        unknown = sorted(set(options) - set(CONDENSER_OPTIONS))
        if unknown:
            raise TypeError(f"{_OP}: unknown option {', '.join(f'`{k}`' for k in unknown)}; the KnowledgeCondenser "
                            f"options are {', '.join(CONDENSER_OPTIONS)}")
        # The options are checked now, on a one-process condenser on the CPU, rather than inside trainer.fit.
        KnowledgeCondenser(self.num_samples, epochs=self.epochs or self.stage_epochs, stage_epochs=self.stage_epochs,
                           rank=0, world_size=1, **options)
        return dict(options)

    def _checked_buffers(self, buffers) -> tuple:
        if isinstance(buffers, torch.Tensor) or not isinstance(buffers, (list, tuple)):
            raise TypeError(f"{_OP}: `buffers` must be a list or tuple of [N, ...] tensors or KnowledgeBuffers, "
                            f"got {type(buffers).__name__}")
        for i, b in enumerate(buffers):
            if isinstance(b, torch.Tensor):
                if b.dim() < 1 or b.shape[0] != self.num_samples:
                    raise ValueError(f"{_OP}: `buffers[{i}]` must have one row per sample ({self.num_samples}), "
                                     f"got shape {tuple(b.shape)}")
            elif not callable(getattr(b, "mix_", None)):
                raise TypeError(f"{_OP}: `buffers[{i}]` must be a tensor or have mix_(k1l, k0, eps), got "
                                f"{type(b).__name__}")
        return tuple(buffers)

    # ------------------------------------------------------------------ what the user's loader takes

    def sampler(self, *, shuffle: bool = True, drop_last: bool = False) -> KCDSampler:
        """The training DataLoader's ``sampler=``: this rank's share of the condensed set, every epoch."""
        return KCDSampler(self, shuffle=shuffle, drop_last=drop_last)

    def dataset(self, dataset, mix: bool = True) -> KCDDataset:
        """``dataset`` of (x, y) as one of (x, y, index), with VAKS on the inputs (Eq. 14) unless ``mix=False``."""
        return KCDDataset(dataset, self, mix=mix)

    def kept_indices(self) -> torch.Tensor:
        """The condensed set K^ as ascending int64 indices on the host (all of them before setup)."""
        if self.condenser is None:
            return torch.arange(self.num_samples)
        return self.condenser.kept_indices()

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        epochs, device = self._schedule_epochs(trainer), trainer.strategy.root_device
        where = (epochs, device, trainer.global_rank, trainer.world_size)
        previous = self.condenser
        # A fit that goes on where this condenser stopped (the same Trainer, fit again) keeps it; any other
        # starts afresh, and a checkpoint (ckpt_path) restores its state after this hook.
        if previous is None or trainer.current_epoch == 0 or previous.next_epoch != trainer.current_epoch \
                or (previous.epochs, previous.device, previous.rank, previous.world_size) != where:
            self.condenser = KnowledgeCondenser(self.num_samples, epochs=epochs, stage_epochs=self.stage_epochs,
                                                device=device, rank=trainer.global_rank,
                                                world_size=trainer.world_size, **self.options)
        self._publish_pairs()
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)
        if self.reload_dataloaders:
            every = trainer.reload_dataloaders_every_n_epochs
            if every == 0:
                trainer.reload_dataloaders_every_n_epochs = 1  # the epoch's length changes at stage ends
            elif every != 1:
                warnings.warn(f"{_OP}: Trainer(reload_dataloaders_every_n_epochs={every}) re-measures the training "
                              f"epoch only every {every} epochs, while the condensed set changes after any stage "
                              f"end; 1 keeps Lightning's batch count (and its end-of-epoch validation) exact")

    def _schedule_epochs(self, trainer) -> int:
        """I: the callback's ``epochs``, else the Trainer's max_epochs; the Trainer must not run past it."""
        max_epochs = trainer.max_epochs
        limited = max_epochs is not None and max_epochs >= 1
        if self.epochs is None:
            if not limited:
                raise ValueError(f"{_OP}: `epochs` is not given and the Trainer has no max_epochs (got {max_epochs}); "
                                 f"pass KCDCallback(epochs=...) or Trainer(max_epochs=...)")
            return max_epochs
        if not limited or max_epochs > self.epochs:
            raise ValueError(f"{_OP}: Trainer(max_epochs={max_epochs}) runs past the callback's schedule of "
                             f"`epochs`={self.epochs}; give both the same number (or a Trainer that stops earlier)")
        return self.epochs

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        condenser = self._require("on_train_epoch_start")
        epoch = trainer.current_epoch
        if condenser.next_epoch != epoch:
            raise ValueError(f"{_OP}: the Trainer starts epoch {epoch} but the KCD state is at epoch "
                             f"{condenser.next_epoch}; a resumed run restores both only from a checkpoint that holds "
                             f"this callback's state (saved with the callback in the Trainer, at an epoch end)")
        if self.check_sampler and not self._sampled_by_me(trainer.train_dataloader):
            raise ValueError(f"{_OP}: the training DataLoader does not sample with this callback's sampler, so it "
                             f"would not train on the condensed set; build it as DataLoader(callback.dataset(train_set), "
                             f"sampler=callback.sampler(), ...) (under DDP too: the sampler shards per rank), or pass "
                             f"check_sampler=False if your own sampler reads callback.kept_indices()")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        condenser = self._require("on_train_batch_end")
        indices = batch_indices(self.indices, pl_module, outputs, batch)
        logits = step_logits(self.logits, pl_module, outputs, batch)
        check_step(indices, logits)
        condenser.observe(indices, logits.detach())  # Eq. 7 + 12: one kernel, no host sync
        condenser.count_yielded(trainer.current_epoch, indices.shape[0])  # for the measured C (a host shape)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        condenser = self._require("on_train_epoch_end")
        epoch = trainer.current_epoch
        if condenser.next_epoch == epoch + 1:
            return  # ended already: a run resumed from a checkpoint saved after this hook
        if condenser.end_epoch(epoch) is not None:  # a stage end: Eq. 13-15, one collective under DDP
            self._publish_pairs()
            self._mix_buffers()
        if self.log:
            self._log(pl_module, condenser)

    def state_dict(self) -> dict:
        """The condenser's state (a collective under DDP: Lightning's checkpointing calls it on every rank)."""
        if self.condenser is None:
            return {} if self._pending_state is None else dict(self._pending_state)
        return {"format": STATE_FORMAT, "condenser": self.condenser.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` (the condenser checks it in full before changing anything)."""
        if not state_dict:
            return
        if not isinstance(state_dict, Mapping) or state_dict.get("format") != STATE_FORMAT \
                or "condenser" not in state_dict:
            raise ValueError(f"{_OP}.load_state_dict: not a {_OP} state (expected format {STATE_FORMAT} with "
                             f"a `condenser` entry)")
        if self.condenser is None:
            self._pending_state = dict(state_dict)
            return
        self.condenser.load_state_dict(state_dict["condenser"])
        self._publish_pairs()

    # ------------------------------------------------------------------ internals

    def _require(self, hook: str) -> KnowledgeCondenser:
        if self.condenser is None:
            raise RuntimeError(f"{_OP}.{hook}: the callback was not set up for fitting (Lightning calls setup(stage="
                               f"'fit') before training); pass it in Trainer(callbacks=[...])")
        return self.condenser

    def _publish_pairs(self) -> None:
        """The condenser's VAKS pairs into the arrays callback.dataset() reads (shared with loader workers)."""
        self.host_partner.copy_(self.condenser.host_partner)
        self.host_eps.copy_(self.condenser.host_eps)

    def _mix_buffers(self) -> None:
        for buffer in self.buffers:
            if isinstance(buffer, torch.Tensor):
                self.condenser.mix_buffer_(buffer)
            else:
                buffer.mix_(*self.condenser.pairs)

    def _log(self, pl_module, condenser: KnowledgeCondenser) -> None:
        """C measured so far, the kept fraction the next epoch trains on, the stage: host numbers, once an
        epoch. Under DDP they are equal on every rank; sync_dist spares Lightning's warning about it."""
        values = {"C": condenser.measured_cost()["C"],
                  "kept_fraction": condenser.kept_indices().numel() / condenser.num_samples,
                  "stage": float(condenser.stage)}
        for name, value in values.items():
            pl_module.log(self.log_prefix + name, value, on_step=False, on_epoch=True, batch_size=1,
                          sync_dist=condenser.world_size > 1)

    def _sampled_by_me(self, loaders) -> bool:
        """Whether one of the training loaders (a DataLoader, or a list or dict of them) samples with
        one of this callback's samplers, directly or inside its batch sampler."""
        if isinstance(loaders, Mapping):
            return any(self._sampled_by_me(v) for v in loaders.values())
        if isinstance(loaders, (list, tuple)):
            return any(self._sampled_by_me(v) for v in loaders)
        found = (getattr(loaders, "sampler", None), getattr(getattr(loaders, "batch_sampler", None), "sampler", None))
        return any(isinstance(s, KCDSampler) and s.callback is self for s in found)


def _callback_class() -> type:
    """``KCDCallback``: :class:`KCDHooks` with Lightning's Callback, made when first looked up."""
    try:
        from lightning.pytorch.callbacks import Callback
    except ImportError as e:
        raise ImportError(f"KCDCallback needs Lightning 2.x (the `lightning` package): {INSTALL_HINT}") from e
    return type("KCDCallback", (KCDHooks, Callback),
                {"__module__": __name__, "__qualname__": "KCDCallback", "__doc__": KCDHooks.__doc__})


def __getattr__(name: str):
    if name == "KCDCallback":
        cls = globals()["KCDCallback"] = _callback_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
