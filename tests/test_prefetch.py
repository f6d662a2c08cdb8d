"""kcd_fast.train.prefetch: batches prepared ahead in a thread against the same work done in turn (its
slow twin): order, errors at their batch, an early stop, and the iterator made in the caller's thread."""
import random
import threading
import time

import pytest
import torch

from kcd_fast.train import prefetch


def work(x, y):
    time.sleep(random.random() * 0.002)  # uneven work: the order must not depend on it
    return x * 2, y, threading.current_thread().name


@pytest.mark.parametrize("ahead", [1, 2, 5])
def test_threaded_batches_equal_the_ones_prepared_in_turn(ahead):
    random.seed(ahead)
    batches = [(torch.randn(3, 7), k) for k in range(23)]
    inline = list(prefetch.prepared(batches, work, "cpu", 0))
    threaded = list(prefetch.prepared(batches, work, "cpu", ahead))
    assert len(threaded) == len(inline) == 23
    for (a, k, where), (b, j, there) in zip(inline, threaded):
        assert torch.equal(a, b) and k == j
        assert where == threading.current_thread().name and there == "kcd_fast-prefetch"


class Source:
    """Batches 0..n-1, recording which thread made the iterator and how far it was read; ``fail_at``
    raises there."""

    def __init__(self, n, fail_at=None):
        self.n, self.fail_at, self.read, self.made_in = n, fail_at, 0, None

    def __iter__(self):
        self.made_in = threading.current_thread().name
        return self._items()

    def _items(self):
        for k in range(self.n):
            if k == self.fail_at:
                raise KeyError(f"batch {k} is unreadable")
            self.read += 1
            yield (torch.tensor(k),)


def test_the_iterator_is_made_in_the_callers_thread():
    source = Source(4)
    assert [int(x) for (x,) in prefetch.prepared(source, lambda x: (x,), "cpu", 2)] == [0, 1, 2, 3]
    assert source.made_in == threading.current_thread().name


@pytest.mark.parametrize("in_work", [False, True])
def test_an_error_reaches_the_caller_at_its_batch(in_work):
    source = Source(6, fail_at=None if in_work else 3)

    def checked(x):
        if in_work and int(x) == 3:
            raise ValueError("batch 3 does not decode")
        return (x,)

    got = []
    with pytest.raises(ValueError if in_work else KeyError, match="batch 3"):
        for (x,) in prefetch.prepared(source, checked, "cpu", 2):
            got.append(int(x))
    assert got == [0, 1, 2]
    assert not any(t.name == "kcd_fast-prefetch" for t in threading.enumerate())


def test_leaving_early_stops_the_thread_and_reads_no_further_than_ahead():
    source = Source(1000)
    it = prefetch.prepared(source, lambda x: (x,), "cpu", 2)
    assert int(next(it)[0]) == 0
    time.sleep(0.3)  # the thread fills its queue and waits
    it.close()
    assert not any(t.name == "kcd_fast-prefetch" for t in threading.enumerate())
    assert source.read <= 1 + 2 + 1  # the one taken, the queue, the one in hand


@pytest.mark.parametrize("ahead", [-1, 1.5, True, "2"])
def test_a_bad_ahead_is_refused_naming_it(ahead):
    with pytest.raises(ValueError, match="ahead must be an int >= 0"):
        next(prefetch.prepared([(1,)], lambda x: (x,), "cpu", ahead))


def test_ahead_by_default_on_cuda_only():
    assert prefetch.default_ahead("cpu") == 0
    assert prefetch.default_ahead("cuda") == prefetch.default_ahead(torch.device("cuda", 1)) == 2
