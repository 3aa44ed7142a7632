"""Preemption: SIGTERM (one process) or JAX's preemption sync point (several) -> save and stop."""

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
    """When to save and stop: SIGTERM (one process) or JAX's preemption sync point (several).

    With several processes the preemption notice reaches them at different steps; JAX's sync
    point (the distributed service catches SIGTERM) names one step at which all of them save.
    """

    def __init__(self):
        self.requested = False
        self._installed = jax.process_count() == 1 and (
            threading.current_thread() is threading.main_thread()
        )
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGTERM, previous)
