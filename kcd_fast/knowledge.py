"""Cached knowledge: the teacher's soft labels p_T(x) of every sample, held in one buffer.

With ``--knowledge cached`` the teacher runs during the first epoch only (which is a full pass
anyway): its outputs fill the buffer, and from then on the KD loss reads the buffer instead of
running the teacher. The condenser's VAKS pairs are applied to the buffer in place at each
stage end, so the augmentation of Eq. 14 acts on the soft labels (the knowledge hints) rather
than on the inputs.

Storage:

* ``dense``: every class, ``dtype`` (fp16 by default): 2 C bytes per sample.
* ``topk``: the k largest probabilities (``dtype``) and their classes (int32); the rest of the
  mass is spread uniformly over the other classes when a row is read back: 6 k bytes per sample
  at fp16 (77 MB for ImageNet at k = 10).

Each stored row is the teacher's view of one input. Filled lazily, it is the augmented view of
the first epoch; filled by a one-off pass (:meth:`KnowledgeBuffer.fill`), it is the
evaluation-transform view. Either way every later epoch distils that one stored view, whatever
crop the student sees, where FKD stores the teacher's outputs for many crops per image (and
replays the crops): FKD keeps the region-level agreement, at many times the storage.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from kcd_fast import knowledge_file as kf
from kcd_fast import ops
from kcd_fast.checks import (INDEX_DTYPES, LOGIT_DTYPES, check_choice, check_index_range, check_int,
                             check_temperature, check_tensor, checks_contents)
from kcd_fast.knowledge_file import KnowledgeFileError, dtype_name

__all__ = ["KnowledgeBuffer", "KnowledgeFileError", "topk_readback_torch"]

_MEMINFO = "/proc/meminfo"


class KnowledgeBuffer:
    """The teacher's soft labels of every sample, dense or top-k, on ``device``.

    Args:
        num_samples: N. num_classes: C.
        storage: ``"dense"`` or ``"topk"``. k: the classes kept per sample with top-k storage.
        dtype: float16, bfloat16 or float32 for the stored probabilities.
        temperature: the KD temperature the probabilities are taken at (softmax(z / T)).
        device: where the buffer lives.
        teacher: a name for the teacher (recorded in saved files).
        samples: which samples the rows are, e.g. the dataset and its subset (recorded in saved
            files; :meth:`load` refuses a file made for other samples). The trainer fills it in.
    """

    def __init__(self, num_samples: int, num_classes: int, *, storage: str = "dense", k: int = 10,
                 dtype: torch.dtype = torch.float16, temperature: float = 4.0, device="cpu", teacher: str = "",
                 samples: str = ""):
        op = "KnowledgeBuffer"
        num_samples, num_classes, k = (check_int(op, name, x, 1) for name, x in (
            ("num_samples", num_samples), ("num_classes", num_classes), ("k", k)))
        check_choice(op, "storage", storage, kf.STORAGES)
        if storage == "topk" and not 1 <= k <= min(64, num_classes):
            raise ValueError(f"KnowledgeBuffer: `k` must lie in [1, min(64, num_classes={num_classes})], got {k}")
        if dtype not in kf.DTYPES.values():
            raise TypeError(f"KnowledgeBuffer: `dtype` must be float16, bfloat16 or float32, got {dtype}")
        temperature = check_temperature(op, temperature)
        for name, x in (("teacher", teacher), ("samples", samples)):  # as a saved file's header holds them
            if not isinstance(x, str):
                raise TypeError(f"KnowledgeBuffer: `{name}` must be a string, got {type(x).__name__}")
        self.num_samples, self.num_classes = num_samples, num_classes
        self.storage, self.k = storage, k if storage == "topk" else num_classes
        self.dtype, self.temperature = dtype, temperature
        self.device = torch.device(device)
        self.teacher, self.samples = teacher, samples
        need = self.num_samples * self.bytes_per_sample()
        _check_fits(need, self.device, f"a {storage} buffer of {self.num_samples} x "
                    f"{self.k if storage == 'topk' else self.num_classes} {dtype_name(dtype)}",
                    "a smaller `k` or dtype" if storage == "topk" else "storage='topk' or a smaller dtype")
        n = self.num_samples
        if storage == "dense":
            self.probs = torch.zeros(n, self.num_classes, dtype=dtype, device=self.device)
            self.values = self.classes = None
        else:
            self.probs = None
            self.values = torch.zeros(n, self.k, dtype=dtype, device=self.device)
            self.classes = torch.zeros(n, self.k, dtype=torch.int32, device=self.device)
        self.filled = torch.zeros(n, dtype=torch.bool, device=self.device)
        # "cuda" becomes the device the arrays are on ("cuda:<current>"), so that a later change of
        # the current device launches nothing on the wrong one.
        self.device = self.filled.device

    # ------------------------------------------------------------------ size

    def bytes_per_sample(self) -> int:
        """Bytes of one sample's knowledge (plus one byte of the filled mask)."""
        item = torch.empty((), dtype=self.dtype).element_size()
        if self.storage == "dense":
            return self.num_classes * item + 1
        return self.k * (item + 4) + 1

    def fully_filled(self) -> bool:
        return bool(self.filled.all())

    # ------------------------------------------------------------------ write / read

    def write(self, indices: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        """Store softmax(teacher_logits / T) for the samples ``indices`` (no host sync on CUDA).

        The indices of one call must be distinct, and the logits finite: refused on the CPU and in
        debug mode on CUDA (:func:`kcd_fast.ops.set_debug`); unchecked on CUDA otherwise, where a
        repeat stores one of its rows, unspecified which, and a non-finite row stores NaN.
        """
        op = "KnowledgeBuffer.write"
        check_tensor(op, "indices", indices, INDEX_DTYPES, 1)
        check_tensor(op, "teacher_logits", teacher_logits, (*LOGIT_DTYPES, torch.float64))
        if teacher_logits.dim() != 2 or teacher_logits.shape != (indices.shape[0], self.num_classes):
            raise ValueError(f"{op}: `teacher_logits` must be [B, {self.num_classes}] with B = len(indices) "
                             f"({indices.shape[0]}), got {tuple(teacher_logits.shape)}")
        idx = indices.to(self.device, non_blocking=True).long()
        if idx.numel() and checks_contents(self.device):
            check_index_range(op, "indices", idx, self.num_samples)
            if torch.unique(idx).numel() != idx.numel():
                raise ValueError(f"{op}: `indices` must be distinct within one call, got a repeated index")
            if not bool(torch.isfinite(teacher_logits).all()):
                raise ValueError(f"{op}: `teacher_logits` must be finite (a NaN or inf row has no soft label)")
        with torch.no_grad():
            p = torch.softmax(teacher_logits.detach().float() / self.temperature, dim=1).to(self.device)
            if self.storage == "dense":
                self.probs.index_copy_(0, idx, p.to(self.dtype))
            else:
                # Ties to the lower class: a stable sort of -p, as reference.topk_encode.
                order = torch.sort(-p, dim=1, stable=True).indices[:, : self.k]
                self.values.index_copy_(0, idx, torch.gather(p, 1, order).to(self.dtype))
                self.classes.index_copy_(0, idx, order.int())
            self.filled.index_fill_(0, idx, True)

    def read(self, indices: torch.Tensor) -> torch.Tensor:
        """Dense float32 [B, C] probabilities of the samples ``indices``: one fused gather.

        Dense: a row gather. Top-k on CUDA: one Triton kernel (kernels/topk_readback.py) that
        writes the stored classes and the uniform remainder; on the CPU its torch twin.
        A row not yet filled reads back as all zeros, with either storage (no host sync).
        ``indices``: int32/int64 [B] in [0, N), range checked on the CPU and in debug mode on CUDA.
        """
        idx = self.checked_indices("KnowledgeBuffer.read", indices)
        if self.storage == "dense":
            return self.probs.index_select(0, idx.long()).float()
        if self.device.type == "cuda":
            from kcd_fast.kernels.topk_readback import topk_readback_triton

            with torch.cuda.device(self.device):
                return topk_readback_triton(self.values, self.classes, idx, self.num_classes, self.filled)
        return topk_readback_torch(self.values, self.classes, idx, self.num_classes, self.filled)

    def checked_indices(self, op: str, indices) -> torch.Tensor:
        """``indices`` (int32/int64 [B]) on the buffer's device, checked as :meth:`write` checks them
        (the range: on the CPU, and on CUDA in debug mode only, where it syncs); errors name ``op``."""
        check_tensor(op, "indices", indices, INDEX_DTYPES, 1)
        idx = indices.to(self.device, non_blocking=True)
        check_index_range(op, "indices", idx, self.num_samples)
        return idx

    def teacher_logits(self, indices: torch.Tensor) -> torch.Tensor:
        """Logits that reproduce the stored probabilities at the buffer's temperature.

        T log p: softmax(T log p / T) = p, so any logit loss at temperature T (KD, DKD) reads the
        cached knowledge unchanged. Zero probabilities are floored at 1e-20.
        """
        return self.temperature * torch.log(self.read(indices).clamp_min(1e-20))

    @torch.no_grad()
    def fill(self, teacher: torch.nn.Module, dataset, *, batch_size: int = 256, device=None, num_workers: int = 0,
             autocast_dtype=None, indices=None, progress=None) -> int:
        """The one-off pass: run the teacher over ``dataset`` (typically the evaluation-transform view
        of the training set) and store every row. ``indices`` restricts it to a share (DDP).
        ``progress``, if given, wraps the batch loader's iterable (a progress bar, a logger) and must
        yield its batches unchanged. Returns the number of teacher forwards."""
        device = torch.device(device) if device is not None else self.device
        if indices is None:
            if len(dataset) != self.num_samples:
                raise ValueError(f"KnowledgeBuffer.fill: the dataset has {len(dataset)} samples, but the buffer "
                                 f"holds {self.num_samples}; pass the dataset the buffer was made for")
            subset, order = dataset, torch.arange(self.num_samples)
        else:
            order = torch.as_tensor(list(indices), dtype=torch.long)  # materialised once (a generator)
            subset = torch.utils.data.Subset(dataset, order.tolist())
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)

        def numbered():  # each batch's inputs with the dataset indices of its rows, in the loader's order
            start = 0
            for batch in (progress(loader) if progress is not None else loader):
                yield batch[0], order[start:start + len(batch[0])]
                start += len(batch[0])

        return self.fill_from(teacher, numbered(), device=device, autocast_dtype=autocast_dtype)

    @torch.no_grad()
    def fill_from(self, teacher: torch.nn.Module, batches, *, device=None, autocast_dtype=None) -> int:
        """The one-off pass over ``batches`` of (inputs, dataset indices), e.g. a loader's own batches
        already on the device: the teacher's logits stored at those indices. Returns the teacher
        forwards."""
        device = torch.device(device) if device is not None else self.device
        teacher.eval()
        done = 0
        for x, index in batches:
            x = x.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits = teacher(x)
            self.write(index, logits)
            done += x.shape[0]
        return done

    # ------------------------------------------------------------------ VAKS on the soft labels

    def mix_(self, k1l: torch.Tensor, k0: torch.Tensor, eps) -> None:
        """Apply VAKS pairs (Eq. 14) in place: dense through :func:`ops.vaks_mix_` (one fused kernel),
        top-k through :func:`ops.vaks_mix_topk_` (the mix truncated back to k). ``k1l``, ``k0`` and
        ``eps`` as those ops take ``dst``, ``src`` and ``eps`` (a tensor, or a number for all pairs),
        on any device: they are moved to the buffer's."""
        d, s, e = (x.to(self.device) if isinstance(x, torch.Tensor) else x for x in (k1l, k0, eps))
        if (isinstance(d, torch.Tensor) and isinstance(s, torch.Tensor) and d.dtype in INDEX_DTYPES
                and s.dtype in INDEX_DTYPES and d.numel() and checks_contents(self.device)):
            # The ranges first; an unfilled row has no soft label to mix (it reads back as zeros).
            check_index_range("KnowledgeBuffer.mix_", "k1l", d, self.num_samples)
            check_index_range("KnowledgeBuffer.mix_", "k0", s, self.num_samples)
            if not bool(self.filled.index_select(0, torch.cat([d, s]).long()).all()):
                raise ValueError("KnowledgeBuffer.mix_: every row of `k1l` and `k0` must be filled (written) first")
        if self.storage == "dense":
            ops.vaks_mix_(self.probs, d, s, e)
        else:
            ops.vaks_mix_topk_(self.values, self.classes, d, s, e, self.num_classes)

    # ------------------------------------------------------------------ DDP

    def complete_ranks(self, owner: torch.Tensor, rank: int) -> None:
        """Make every rank's replica whole after each rank filled its own share.

        ``owner`` (int64 [N], the same on every rank) names the rank whose row counts for each
        sample. Each rank zeroes the bytes of the rows it does not own (whatever they hold, NaN
        included); ONE all_reduce (SUM) of the raw bytes then leaves every row with its owner's
        bytes exactly (the other addends are zero).
        """
        mine = (owner.to(self.device) == rank)
        tensors = [self.probs] if self.storage == "dense" else [self.values, self.classes]
        flat = []
        for t in tensors:
            raw = t.view(torch.uint8)  # [N, row bytes]: the buffers are contiguous
            raw.masked_fill_(~mine.view(-1, 1), 0)
            flat.append(raw.reshape(-1))
        flat.append(self.filled.view(torch.uint8) & mine.to(torch.uint8))
        packed = torch.cat(flat)
        dist.all_reduce(packed)
        offset = 0
        for t in tensors:
            size = t.numel() * t.element_size()
            t.view(torch.uint8).reshape(-1).copy_(packed[offset:offset + size])
            offset += size
        self.filled.copy_(packed[offset:].bool())

    # ------------------------------------------------------------------ files

    def header(self) -> dict:
        return {"num_samples": self.num_samples, "num_classes": self.num_classes, "storage": self.storage,
                "k": self.k, "dtype": dtype_name(self.dtype), "temperature": self.temperature,
                "teacher": self.teacher, "samples": self.samples}

    def save(self, path, *, teacher_hash: str = "") -> None:
        """Write a memory-mappable file (:mod:`kcd_fast.knowledge_file`): a 4 KiB header (magic + JSON),
        then the raw arrays. The file appears whole or not at all."""
        head = dict(self.header(), teacher_hash=teacher_hash, filled=int(self.filled.sum()))
        kf.write_file(path, head, self._arrays())

    def _array_names(self) -> list[str]:
        return [name for name, _, _ in kf.layout(self.header())]

    def _arrays(self):
        return [getattr(self, name) for name in self._array_names()]

    @staticmethod
    def read_header(path) -> dict:
        """The header of a knowledge file, checked: every key :meth:`save` writes, of its type and range."""
        return kf.read_header(path)

    @classmethod
    def load(cls, path, *, device="cpu", num_samples: int | None = None, num_classes: int | None = None,
             temperature: float | None = None, storage: str | None = None, k: int | None = None,
             dtype: torch.dtype | None = None, teacher_hash: str | None = None, teacher: str | None = None,
             samples: str | None = None) -> "KnowledgeBuffer":
        """Open a file written by :meth:`save`.

        On the CPU the arrays ARE the file's mapping, copy-on-write: nothing is read or allocated
        up front (an array the layout leaves misaligned for its dtype is copied), and in-place
        changes (:meth:`mix_`, :meth:`write`) stay private to this process. The file must not be
        modified in place while mapped (:meth:`save` replaces a file, which is safe). On CUDA
        the mapping is copied into the device buffer.

        Refuses (:class:`KnowledgeFileError`) a corrupt file, and one whose N, C, temperature,
        storage, k (top-k files only), dtype, teacher name, teacher hash or samples differ from those
        given (None: not checked; an empty string, in the file or given, is not checked), naming both.
        """
        head = kf.read_header(path)
        _check_matches(path, head, num_samples=num_samples, num_classes=num_classes, temperature=temperature,
                       storage=storage, k=k, dtype=None if dtype is None else dtype_name(dtype),
                       teacher=teacher, teacher_hash=teacher_hash, samples=samples)
        size, expected = os.path.getsize(path), kf.file_bytes(head)
        if size != expected:
            why = "truncated" if size < expected else f"longer than its header says ({size - expected} bytes more)"
            raise KnowledgeFileError(f"{path} is {why}: {size} bytes, expected {expected}")
        device = torch.device(device)
        # On the CPU: a buffer without storage (meta), which then takes the mapped arrays; no memory check.
        buf = cls(head["num_samples"], head["num_classes"], storage=head["storage"], k=head["k"],
                  dtype=kf.DTYPES[head["dtype"]], temperature=head["temperature"],
                  device="meta" if device.type == "cpu" else device, teacher=head["teacher"],
                  samples=head["samples"])
        for name, raw, dt, shape in kf.map_arrays(path, head):
            if device.type == "cpu":
                if raw.data_ptr() % dt.itemsize:
                    raw = raw.clone()  # an array after an odd count of 2-byte values: an aligned copy
                setattr(buf, name, raw.view(dt).view(shape))
            else:
                getattr(buf, name).view(torch.uint8).view(-1).copy_(raw)
        buf.device = buf.filled.device
        buf._check_contents(path, head["filled"])
        return buf

    def _check_contents(self, path, filled: int) -> None:
        """A loaded file's filled mask holds 0/1 bytes, as many 1s as its header says; its class ids lie in [0, C)."""
        mask = self.filled.view(torch.uint8)
        if int(mask.max()) > 1:
            raise KnowledgeFileError(f"{path} is corrupt: its filled mask holds bytes other than 0 and 1")
        count = int(mask.sum())
        if count != filled:
            raise KnowledgeFileError(f"{path} is corrupt: its header says {filled} samples are filled, "
                                     f"its filled mask {count}")
        if self.storage == "topk":
            lo, hi = int(self.classes.min()), int(self.classes.max())
            if lo < 0 or hi >= self.num_classes:
                raise KnowledgeFileError(f"{path} is corrupt: it holds class {lo if lo < 0 else hi}, "
                                         f"outside [0, {self.num_classes})")

    def state_dict(self) -> dict:
        return {"header": self.header(), "arrays": [t.to("cpu", copy=True) for t in self._arrays()]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`. Everything is checked before anything is written, so a refused
        state leaves the buffer as it was: the header, one array per stored one, each of the stored
        dtype and shape, and top-k class ids in [0, C)."""
        op = "KnowledgeBuffer.load_state_dict"
        if not isinstance(state, dict) or not {"header", "arrays"} <= state.keys():
            raise KnowledgeFileError(f"{op}: `state` must be a dict with 'header' and 'arrays', as state_dict() "
                                     f"returns, got {type(state).__name__}"
                                     + (f" with keys {sorted(state)}" if isinstance(state, dict) else ""))
        if state["header"] != self.header():
            raise KnowledgeFileError(f"{op}: the state is for {state['header']}, this buffer is {self.header()}")
        arrays, names = state["arrays"], self._array_names()
        if not isinstance(arrays, (list, tuple)) or len(arrays) != len(names):
            raise KnowledgeFileError(f"{op}: the state must hold {len(names)} arrays ({', '.join(names)}), got "
                                     + (f"{len(arrays)}" if isinstance(arrays, (list, tuple)) else type(arrays).__name__))
        for name, mine, theirs in zip(names, self._arrays(), arrays):
            if not (isinstance(theirs, torch.Tensor) and theirs.dtype == mine.dtype and theirs.shape == mine.shape):
                got = (f"{dtype_name(theirs.dtype)} {list(theirs.shape)}" if isinstance(theirs, torch.Tensor)
                       else type(theirs).__name__)
                raise KnowledgeFileError(f"{op}: `{name}` must be a {dtype_name(mine.dtype)} tensor of shape "
                                         f"{list(mine.shape)}, got {got}")
        if self.storage == "topk":
            check_index_range(op, "classes", arrays[1].reshape(-1).cpu(), self.num_classes)
        for t, s in zip(self._arrays(), arrays):
            t.copy_(s.to(self.device))


def _check_matches(path, head: dict, **wanted) -> None:
    """Refuse a file whose header differs from what this run has (``wanted``, by header key; None, or
    an empty string in the file or given, is not compared), naming both."""
    for name in ("num_samples", "num_classes", "temperature"):
        want = wanted[name]
        if want is not None and head[name] != want:
            what = {"num_samples": "samples", "num_classes": "classes", "temperature": "temperature"}[name]
            raise KnowledgeFileError(f"{path} holds knowledge for {head[name]} {what}, but this run has "
                                     f"{want}; it was made for another dataset or setting")
    checks = (("storage", head["storage"], wanted["storage"]),
              ("k", head["k"], wanted["k"] if head["storage"] == "topk" else None),  # k means nothing for dense
              ("dtype", head["dtype"], wanted["dtype"]),
              ("teacher", head["teacher"], wanted["teacher"] if head["teacher"] else None),
              ("teacher hash", head["teacher_hash"], wanted["teacher_hash"] if head["teacher_hash"] else None),
              ("samples", head["samples"], wanted["samples"] if head["samples"] else None))
    for what, have, want in checks:
        if want is not None and want != "" and have != want:
            why = ("another dataset, subset or seed" if what == "samples" else "another teacher or setting")
            raise KnowledgeFileError(f"{path} holds knowledge with {what} {have!r}, but this run has {want!r}; "
                                     f"it was made for {why}")


def topk_readback_torch(values, classes, indices, num_classes, filled):
    """Dense float32 [B, C] rows ``indices`` of top-k storage (``values``, ``classes`` [N, k]): the
    uniform remainder, then the stored classes; rows not ``filled`` all zeros. The CPU path of
    :meth:`KnowledgeBuffer.read`, and the slow twin of its Triton read-back
    (kernels/topk_readback.py)."""
    idx = indices.long()
    v = values.index_select(0, idx).float()
    c = classes.index_select(0, idx).long()
    k = v.shape[1]
    rest = (1.0 - v.sum(dim=1, keepdim=True)).clamp_min(0.0)
    uniform = rest / max(num_classes - k, 1) if num_classes > k else torch.zeros_like(rest)
    out = uniform.expand(v.shape[0], num_classes).contiguous()
    out.scatter_(1, c, v)
    return out.masked_fill_(~filled.index_select(0, idx).view(-1, 1), 0.0)


def _host_available() -> int | None:
    """Bytes of host memory available to a new allocation: MemAvailable (free plus reclaimable
    cache), else the free pages; None where neither is known."""
    try:
        with open(_MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_fits(nbytes: int, device: torch.device, what: str, hint: str) -> None:
    """Refuse a buffer the device cannot hold, naming the sizes and ``hint`` (what to use instead)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        avail, where = free, f"{device} ({free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB)"
    elif device.type == "cpu":
        avail = _host_available()
        if avail is None:
            return
        where = f"host memory ({avail / 2**30:.1f} GiB available)"
    else:
        return
    if nbytes > avail:
        raise MemoryError(f"KnowledgeBuffer: {what} needs {nbytes / 2**30:.2f} GiB, more than {where}; use {hint}")
