"""Prefetch: an iterator's next items made by a background thread into a small bounded queue."""

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_END = object()  # the source is exhausted


class _Raised:
    """The producer's exception, handed to the consumer in the place of an item."""

    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher(Generic[T]):
    """Iterates over `source` in order, its items made up to `depth` ahead by a daemon thread.

    The data work (reading, stacking, the host-to-device copy) then runs while the consumer's
    step does. An exception of the source is raised by __next__ in its place (the same object,
    so its type, message and traceback). close() (or leaving a `with` block) stops the thread and
    joins it, also while it waits on a full queue; items not yet taken are dropped.
    """

    def __init__(self, source: Iterator[T], depth: int = 2, name: str = "prefetch"):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
        except BaseException as e:  # handed over: the consumer raises it
            self._put(_Raised(e))
        else:
            self._put(_END)

    def _put(self, item) -> bool:
        """Put item, waiting while the queue is full; False once close() has been called."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher[T]":
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END or isinstance(item, _Raised):
            self._done = True
            self._thread.join()
            if item is _END:
                raise StopIteration
            raise item.error
        return item

    @property
    def alive(self) -> bool:
        """Whether the producer thread is still running."""
        return self._thread.is_alive()

    def close(self, timeout: float = 60.0) -> bool:
        """Stop the producer and join it (it finishes the item it is making, then stops); items
        not taken are dropped. Returns whether it stopped within `timeout` seconds (a daemon
        thread stuck in the source does not keep the process alive)."""
        self._stop.set()
        self._done = True
        self._thread.join(timeout)
        while True:  # release what was made (device buffers, on an accelerator)
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        return not self._thread.is_alive()

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
