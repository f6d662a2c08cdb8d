"""The file format of a :class:`~kcd_fast.KnowledgeBuffer`, made to be memory-mapped.

A file is a header of :data:`HEADER_BYTES` bytes, :data:`MAGIC`, the length of a JSON object (8 bytes,
little-endian) and the object itself, zero-padded; then the buffer's arrays, raw and in the order
of :func:`layout`: ``probs`` (dense storage) or ``values`` and ``classes`` (top-k), then ``filled``.
The header's keys are :data:`HEADER_TYPES`; :func:`check_header` refuses any other header.
"""
from __future__ import annotations

import json
import math
import os
from numbers import Integral, Real

import numpy as np
import torch

from kcd_fast.checks import check_temperature
from kcd_fast.files import atomic_write

__all__ = ["KnowledgeFileError", "MAGIC", "HEADER_BYTES", "SAVE_CHUNK_BYTES", "DTYPES", "STORAGES", "HEADER_TYPES",
           "dtype_name", "check_header", "layout", "file_bytes", "read_header", "write_file", "map_arrays"]

MAGIC = b"KCDKNOW1"
HEADER_BYTES = 4096
SAVE_CHUNK_BYTES = 64 << 20  # write_file copies a device array to the host this many bytes at a time
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
STORAGES = ("dense", "topk")  # every class, or the k largest probabilities and their classes
# The keys of a header, and their JSON types.
HEADER_TYPES = {"num_samples": int, "num_classes": int, "storage": str, "k": int, "dtype": str,
                "temperature": float, "teacher": str, "teacher_hash": str, "filled": int, "samples": str}


class KnowledgeFileError(ValueError):
    """A knowledge file that does not match (N, C, storage) or is not a knowledge file."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``: how a header names a dtype."""
    return str(dtype).replace("torch.", "")


def check_header(path, head) -> None:
    """Refuse a header that lacks a key of :data:`HEADER_TYPES`, or holds a bad value."""
    def corrupt(why):
        return KnowledgeFileError(f"{path} is corrupt: its header {why}")

    if not isinstance(head, dict):
        raise corrupt(f"is a JSON {type(head).__name__}, not an object")
    for key, kind in HEADER_TYPES.items():
        if key not in head:
            raise corrupt(f"has no `{key}`")
        x = head[key]
        if kind is str:
            ok = isinstance(x, str)
        else:
            ok = isinstance(x, Integral if kind is int else Real) and not isinstance(x, bool)
        if not ok:
            want = "a string" if kind is str else "an integer" if kind is int else "a number"
            raise corrupt(f"has `{key}` = {x!r}, expected {want}")
    n, c, k = head["num_samples"], head["num_classes"], head["k"]
    if head["storage"] not in STORAGES:
        raise corrupt(f"has `storage` = {head['storage']!r}, expected 'dense' or 'topk'")
    if head["dtype"] not in DTYPES:
        raise corrupt(f"has `dtype` = {head['dtype']!r}, expected one of {', '.join(DTYPES)}")
    if n < 1 or c < 1:
        raise corrupt(f"has {n} samples and {c} classes, expected at least 1 of each")
    if not (k == c if head["storage"] == "dense" else 1 <= k <= min(64, c)):
        raise corrupt(f"has k = {k} for {head['storage']} storage of {c} classes")
    try:  # the rule a buffer's temperature follows
        check_temperature("header", head["temperature"])
    except ValueError:
        raise corrupt(f"has temperature {head['temperature']}, expected a finite number > 0 whose inverse is "
                      f"a finite float32") from None
    if not 0 <= head["filled"] <= n:
        raise corrupt(f"says {head['filled']} of {n} samples are filled")


def layout(head: dict) -> list:
    """(attribute, shape, dtype) of the arrays that follow the header of a file, in order."""
    n, c, k, dt = head["num_samples"], head["num_classes"], head["k"], DTYPES[head["dtype"]]
    arrays = [("probs", (n, c), dt)] if head["storage"] == "dense" else [("values", (n, k), dt),
                                                                          ("classes", (n, k), torch.int32)]
    return arrays + [("filled", (n,), torch.bool)]


def file_bytes(head: dict) -> int:
    """The size of a file with this header."""
    return HEADER_BYTES + sum(math.prod(shape) * dt.itemsize for _, shape, dt in layout(head))


def read_header(path) -> dict:
    """The header of a knowledge file, checked (:func:`check_header`)."""
    with open(path, "rb") as f:
        blob = f.read(HEADER_BYTES)
    if len(blob) < len(MAGIC) + 8 or blob[: len(MAGIC)] != MAGIC:
        raise KnowledgeFileError(f"{path} is not a kcd_fast knowledge file")
    if len(blob) < HEADER_BYTES:
        raise KnowledgeFileError(f"{path} is truncated: {len(blob)} bytes, less than its header")
    size = int.from_bytes(blob[len(MAGIC):len(MAGIC) + 8], "little")
    if len(MAGIC) + 8 + size > HEADER_BYTES:
        raise KnowledgeFileError(f"{path} is corrupt: its header claims {size} bytes")
    try:
        head = json.loads(blob[len(MAGIC) + 8:len(MAGIC) + 8 + size].decode())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise KnowledgeFileError(f"{path} is corrupt: its header is not JSON ({exc})") from None
    check_header(path, head)
    return head


def write_file(path, head: dict, arrays: list) -> None:
    """Write ``head`` and the raw bytes of ``arrays`` (in :func:`layout`'s order) to ``path``, whole or
    not at all (:func:`kcd_fast.files.atomic_write`)."""
    text = json.dumps(head).encode()
    if len(text) + len(MAGIC) + 8 > HEADER_BYTES:
        raise ValueError("KnowledgeBuffer.save: header too long (teacher name?)")
    with atomic_write(path) as f:
        f.write(MAGIC + len(text).to_bytes(8, "little") + text)
        f.write(b"\0" * (HEADER_BYTES - f.tell()))
        for t in arrays:
            raw = t.detach().contiguous().view(torch.uint8).view(-1)
            # In pieces of SAVE_CHUNK_BYTES: a 2.56 GB ImageNet buffer on the GPU needs no host copy
            # of its own size (nor a second one for the bytes object), on the CPU no copy at all.
            for start in range(0, raw.numel(), SAVE_CHUNK_BYTES):
                f.write(memoryview(raw[start:start + SAVE_CHUNK_BYTES].cpu().numpy()))


def map_arrays(path, head: dict) -> list:
    """The arrays of a checked file (its size included, :func:`file_bytes`) as (attribute, raw bytes,
    dtype, shape), each ``raw`` a uint8 view of one copy-on-write mapping of the file: nothing is read
    up front, and writes to the views stay private to this process."""
    size = os.path.getsize(path)
    mapped = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", offset=HEADER_BYTES,
                                        shape=(size - HEADER_BYTES,)))  # page-aligned
    out, offset = [], 0
    for name, shape, dt in layout(head):
        nbytes = math.prod(shape) * dt.itemsize
        out.append((name, mapped[offset:offset + nbytes], dt, shape))
        offset += nbytes
    return out
