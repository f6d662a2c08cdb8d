"""Progress of a pass over the data: a tqdm bar on a terminal, and with ``--log-every N`` a line every
N steps, on rank 0 only, from host clocks (no host sync with the GPU)."""
from __future__ import annotations

import time


def track(iterable, cfg, desc: str, total_images: int, ranks: int = 1):
    """``iterable``'s batches, unchanged, counted on rank 0 against ``total_images``; each batch counts
    ``ranks`` times (under DDP every rank passes a batch of the same size at each step). ``cfg``
    gives ``progress``, ``log_every`` and ``rank``. A line: images/s, elapsed time, ETA."""
    log_every = getattr(cfg, "log_every", 0)
    if not (getattr(cfg, "progress", False) or log_every) or cfg.rank != 0:
        return iterable
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        # disable=None: no bar when stderr is not a terminal (a log file gets the per-epoch lines only).
        bar = tqdm(total=total_images, desc=desc, unit="img", unit_scale=True, dynamic_ncols=True, leave=False,
                   disable=None)
    return _counted(iterable, bar, log_every, desc, total_images, ranks)


def _counted(iterable, bar, log_every: int, desc: str, total_images: int, ranks: int):
    start, done, steps = time.time(), 0, 0
    try:
        for batch in iterable:
            yield batch
            n = len(batch[1]) * ranks
            done, steps = min(done + n, total_images), steps + 1  # ranks' last batches may be one short
            if bar is not None:
                bar.update(n)
            if log_every and steps % log_every == 0:
                elapsed = time.time() - start
                rate = done / max(elapsed, 1e-9)
                eta = max(total_images - done, 0) / max(rate, 1e-9)
                line = (f"{desc} step {steps}: {done}/{total_images} images, {rate:.0f} img/s, "
                        f"{clock(elapsed)} elapsed, ETA {clock(eta)}")
                if bar is not None and not bar.disable:
                    bar.write(line)
                else:
                    print(line, flush=True)
    finally:
        if bar is not None:
            bar.close()


def clock(seconds: float) -> str:
    """h:mm:ss"""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
