"""The training batch stream: a function of (seed, step) alone, whatever reads it."""

import numpy as np

from consistency.io import data

KW = {"seed": 3, "image_size": 8, "num_channels": 1, "random_flip": True}


def _take(n, **kwargs):
    batches = data.make_batches(data.make_source("digits"), **KW, **kwargs)
    return [next(batches) for _ in range(n)]


def test_the_stream_does_not_depend_on_threads_resumes_or_processes():
    """Reader threads (the digits configs use 1, base 4), a resume at step 2 and a split over two
    processes all give the same global batches, flips included."""
    one = _take(4, local_batch=16, num_threads=1)
    assert not np.array_equal(one[0]["image"], one[1]["image"])
    for got in (_take(4, local_batch=16, num_threads=4), _take(4, local_batch=16, num_threads=0)):
        for a, b in zip(one, got, strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    resumed = _take(2, local_batch=16, num_threads=2, start_step=2)
    for a, b in zip(one[2:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    halves = [
        _take(4, local_batch=8, num_threads=1, process_index=p, process_count=2) for p in (0, 1)
    ]
    for k, a in enumerate(one):
        whole = np.concatenate([halves[0][k]["image"], halves[1][k]["image"]])
        np.testing.assert_array_equal(a["image"], whole)
