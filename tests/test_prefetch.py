"""The prefetcher: order, bounded read-ahead, exceptions, shutdown; the loop leaves no thread."""

import itertools
import os
import signal
import threading
import time

import numpy as np
import pytest

from configs import test as test_config
from consistency.experiment import train
from consistency.io import data
from consistency.io.prefetch import Prefetcher

# The test config with a one-level UNet and no PNG grids: quick to compile.
SMALL = {"channels": 4, "channel_mult": (1,), "attn_resolutions": ()}


def _counting(counter: list):
    for i in itertools.count():
        counter.append(i)
        yield i


def test_items_come_in_order_and_the_thread_ends_with_the_source():
    fetch = Prefetcher(iter(range(50)), depth=2)
    assert list(fetch) == list(range(50))
    assert not fetch.alive
    with pytest.raises(StopIteration):
        next(fetch)


def test_reads_at_most_depth_ahead():
    made = []
    fetch = Prefetcher(_counting(made), depth=2)
    assert next(fetch) == 0
    deadline = time.time() + 10
    while len(made) < 4 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # room for more, were it to read further
    # The one taken, two in the queue, one made and waiting for room.
    assert len(made) == 4
    assert [next(fetch) for _ in range(3)] == [1, 2, 3]
    assert fetch.close() and not fetch.alive


def test_a_source_exception_is_raised_in_its_place():
    error = ValueError("batch 3 is unreadable: /data/shard-00003")

    def source():
        yield from range(3)
        raise error

    fetch = Prefetcher(source(), depth=2)
    assert [next(fetch) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="batch 3 is unreadable") as raised:
        next(fetch)
    assert raised.value is error and not fetch.alive
    with pytest.raises(StopIteration):
        next(fetch)


def test_close_stops_a_producer_waiting_on_a_full_queue_or_inside_the_source():
    fetch = Prefetcher(_counting([]), depth=2)
    next(fetch)
    time.sleep(0.1)  # the producer now waits for room
    assert fetch.close() and not fetch.alive
    with pytest.raises(StopIteration):
        next(fetch)

    def slow():
        while True:
            time.sleep(0.3)
            yield 0

    fetch = Prefetcher(slow(), depth=1)
    started = time.time()
    assert fetch.close() and not fetch.alive  # it finishes the item it is making, then stops
    assert time.time() - started < 5
    with Prefetcher(_counting([]), depth=1) as fetch:
        next(fetch)
    assert not fetch.alive


def _inputs_threads():
    return [t for t in threading.enumerate() if t.name == "train-inputs"]


def _config():
    config = test_config.get_config()
    config.model.unet.update(**SMALL)
    config.sampling.grid_size = 0
    config.training.update(num_steps=4, log_every=1, snapshot_every=2)
    return config


@pytest.mark.parametrize("ending", ["normal", "source error", "non-finite", "preempted"])
def test_the_training_loop_leaves_no_thread(ending, tmp_path, monkeypatch):
    """Every way out of the loop stops its input thread; the source's error keeps its message."""
    real = data.make_batches

    def source(*args, start_step=0, **kwargs):
        for k, batch in enumerate(real(*args, start_step=start_step, **kwargs), start_step):
            # Batch k feeds step k + 1.
            if k == 2 and ending == "source error":
                raise OSError("shard 7 of the training set is unreadable")
            if k == 2 and ending == "non-finite":
                batch = dict(batch, image=batch["image"] * np.nan)
            if k == 2 and ending == "preempted":
                assert callable(signal.getsignal(signal.SIGTERM))  # the loop's watch
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(data, "make_batches", source)
    expected = {
        "normal": None,
        "source error": (OSError, "shard 7 of the training set is unreadable"),
        "non-finite": (train.NonFiniteError, "at step 3 "),
        "preempted": (train.Preempted, None),
    }[ending]
    if expected is None:
        assert int(train.train_and_evaluate(_config(), str(tmp_path)).step) == 4
    else:
        with pytest.raises(expected[0], match=expected[1]):
            train.train_and_evaluate(_config(), str(tmp_path))
    assert not _inputs_threads()
