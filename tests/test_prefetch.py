"""DeviceBatches: batches prepared a step ahead are the serial ones, and resume stays exact."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from hsissl.data.loaders import TileBatches, endless
from hsissl.data.normalize import Normalizer
from hsissl.data.prefetch import DeviceBatches
from test_loaders import BANDS, make_split

NORM = Normalizer((50.0,) * BANDS, (10.0,) * BANDS)


def serial(loader: TileBatches, n: int) -> list[torch.Tensor]:
    """What the trainer did before: next host batch, then normalise, one at a time."""
    stream = endless(loader)
    return [NORM(next(stream)[0]) for _ in range(n)]


def test_prefetched_batches_equal_the_serial_ones_across_epochs():
    split = make_split(53)
    expected = serial(TileBatches(split, 8, seed=3), 15)  # 6 batches an epoch: 2.5 epochs
    with DeviceBatches(TileBatches(split, 8, seed=3), NORM, "cpu", depth=3) as batches:
        got = [x for x, _ in itertools.islice(batches, 15)]
    assert len(got) == 15
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)


def test_the_state_handed_with_a_batch_resumes_at_the_next_one():
    """The thread reads ahead, so the loader itself is past the batch the step used: the state
    that comes with each batch is the one a checkpoint must hold."""
    split = make_split(53)
    expected = serial(TileBatches(split, 8, seed=3), 12)
    for stop in (1, 5, 6, 11):  # inside an epoch and at an epoch's last batch
        with DeviceBatches(TileBatches(split, 8, seed=3), NORM, "cpu", depth=2) as batches:
            state = next(itertools.islice(batches, stop - 1, None))[1]
        resumed = TileBatches(split, 8, seed=3)
        resumed.load_state_dict(state)
        torch.testing.assert_close(serial(resumed, 1)[0], expected[stop])


class BrokenLoader:
    """Two good batches, then the error a corrupt shard would raise."""

    def __init__(self) -> None:
        self.served = 0

    def __iter__(self):
        while True:
            if self.served == 2:
                raise OSError("shard 3: read failed")
            self.served += 1
            yield torch.zeros(2, BANDS, 4, 4, dtype=torch.int16), torch.zeros(2, 4, 4)

    def state_dict(self) -> dict:
        return {"served": self.served}


def test_a_loader_error_reaches_the_consumer_after_the_good_batches():
    with DeviceBatches(BrokenLoader(), NORM, "cpu") as batches:
        stream = iter(batches)
        assert [next(stream)[1] for _ in range(2)] == [{"served": 1}, {"served": 2}]
        with pytest.raises(OSError, match="shard 3: read failed"):
            next(stream)


def test_close_stops_the_thread_while_it_waits_on_a_full_queue():
    batches = DeviceBatches(TileBatches(make_split(53), 8), NORM, "cpu", depth=1)
    next(iter(batches))
    threads = [t for t in threading.enumerate() if t.name == "device-batches"]
    assert threads
    batches.close()
    assert not any(t.is_alive() for t in threads)


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth must be >= 1"):
        DeviceBatches(TileBatches(make_split(53), 8), NORM, "cpu", depth=0)
