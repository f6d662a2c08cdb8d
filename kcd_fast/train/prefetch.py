"""Input batches prepared ahead of the step that takes them: :func:`prepared`.

On CUDA the JPEG path's main-process work (nvJPEG decode, crops, VAKS mix) runs on a side stream, so the
device overlaps it with the step already queued. The host does not: torchvision's batched decode waits
on the host until its own stream has decoded the batch, so a step is queued only after the next batch's
decode has ended. A background thread that prepares the batches, ``ahead`` of the step, lets the main
thread queue the step meanwhile (the decode releases the GIL): the host then takes
max(decode, queueing the step) per batch instead of their sum, which is what decides the step time when
the step waits on the loader.
"""
from __future__ import annotations

import queue
import threading
from contextlib import nullcontext

import torch

from kcd_fast import jpeg

__all__ = ["prepared", "default_ahead"]

POLL_S = 0.1  # how often a producer blocked on a full queue checks that its consumer still takes batches


def default_ahead(device) -> int:
    """Batches held ready by default: 2 on CUDA, 0 on the CPU, whose main process trains on the cores a
    thread would take."""
    return 2 if torch.device(device).type == "cuda" else 0


def prepared(batches, work, device, ahead: int):
    """``work(*batch)`` for each ``batch`` of ``batches``, in their order.

    ``ahead`` 0: each in turn when asked for, queued on a side CUDA stream that the current stream then
    waits for (:func:`kcd_fast.jpeg.on_stream`; on the CPU just the call). ``ahead`` > 0: a background
    thread holds up to ``ahead`` batches ready (and prepares the next), on a side stream of its own; each is
    handed over with a device-side wait on an event recorded after its work (no host sync), its CUDA
    tensors marked as used on the current stream. Both give the same batches. An exception raised by
    ``batches`` or ``work`` reaches the caller at the batch it belongs to; leaving the loop early stops
    the thread (it ends once the batch it is preparing is done).
    """
    if isinstance(ahead, bool) or not isinstance(ahead, int) or ahead < 0:
        raise ValueError(f"ahead must be an int >= 0 (batches prepared ahead of the step), got {ahead!r}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    if ahead == 0:
        for batch in batches:
            yield jpeg.on_stream(side, work, *batch)
        return
    # the iterator is made in the caller's thread, as without a thread (a DataLoader with workers starts
    # them and hands out their first indices as it is made)
    yield from _threaded(iter(batches), work, device, side, ahead)


_DONE, _RAISED = object(), object()  # markers: the batches ended; what follows is an exception


def _threaded(it, work, device, side, ahead: int):
    slots: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            if side is not None:
                torch.cuda.set_device(device)  # the thread's current device is its own
            with torch.cuda.stream(side) if side is not None else nullcontext():
                for batch in it:
                    out = work(*batch)
                    ready = None
                    if side is not None:
                        ready = torch.cuda.Event()
                        ready.record(side)
                    if not put((out, ready)):
                        return
            put(_DONE)
        except BaseException as error:  # handed to the consumer, raised there
            put((_RAISED, error))

    thread = threading.Thread(target=produce, name="kcd_fast-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if item[0] is _RAISED:
                raise item[1]
            out, ready = item
            yield out if ready is None else jpeg.hand_over(out, ready, device)
    finally:
        stop.set()
        thread.join()
