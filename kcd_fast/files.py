"""Files written whole or not at all, and files known by their content."""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

__all__ = ["atomic_write", "file_hash"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open ``path + ".tmp"`` for writing and, once the block ends without an error, move it onto
    ``path`` in one step (``os.replace``): a reader, or a run stopped midway, never sees half a file.
    On an error the temporary file is removed and ``path`` is left as it was. ``mode``: "wb" or "w".

        with atomic_write(out / "metrics.jsonl", "w") as f:
            f.write(text)
        with atomic_write(out / "checkpoint.pth") as f:
            torch.save(state, f)
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: `mode` must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_HASHES: dict = {}  # (real path, device, inode, size, mtime_ns) -> sha256 hex


def file_hash(path, length: int | None = 16) -> str:
    """The sha256 of a file, hex, its first ``length`` digits ("" for no file). A file is read once
    while it stays the same file with the same size and modification time."""
    if not path or not os.path.isfile(path):
        return ""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key][:length]
