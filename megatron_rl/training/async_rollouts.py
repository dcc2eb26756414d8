"""Asynchronous rollouts with bounded staleness: the engines generate the batch of step t + k while the actor trains
step t (`algorithm.max_staleness = k >= 1`; docs/training.md, "Asynchronous RL").

The schedule is fixed, so an asynchronous run is as reproducible (and as resumable) as a synchronous one:

    batch u is generated with the weights after step u - 1 - k (the starting weights for u <= k + 1)

The trainer enforces it with two calls around each weight update (`RolloutProducer`):

    rollouts = producer.take(step)            # batch `step` (generated earlier; waits if it is not ready yet)
    ... train on it ...
    producer.wait_generated(step + k)         # every batch that must see the current weights has seen them
    pool.sync_weights(...)                    # version + 1; generation calls never straddle it (the pool's lock)
    ... evaluate, checkpoint (with producer.pending(step): batches step+1 .. step+k) ...
    producer.allow(step + k + 1)              # the next batch may now be generated, with the new weights

so a trained sample is at most k weight versions old: the staleness of step t is min(t - 1, k) - (steps that skipped
their update). With k = 0 the trainer does not use this module at all (the synchronous loop, unchanged).

A producer thread in the driver process runs `collect(step)` (rollout, reward, dynamic sampling, LSPO: one
decision per step over whole groups, docs/design.md contract 3) for the allowed steps in order. Its failures reach
the trainer at the next `take` / `wait_generated`; `stop()` ends it after its current step.
"""
from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

__all__ = ["RolloutProducer"]


class RolloutProducer(Generic[T]):
    """Runs `collect(step)` for steps first..last in a background thread, each once it is allowed (module docstring).

    pending: batches already generated before a restart (from a checkpoint), keyed by step: they are not generated
    again. The thread starts at the first step it does not hold."""

    def __init__(self, collect: Callable[[int], T], *, first: int, last: int, pending: dict[int, T] | None = None,
                 name: str = "rollout-producer"):
        self._collect = collect
        self._last = last
        self._ready: dict[int, T] = dict(pending or {})
        self._next = first
        while self._next in self._ready:
            self._next += 1
        self._allowed = first - 1
        self._error: BaseException | None = None
        self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- trainer side ------------------------------------------------------------------------------------------
    def allow(self, step: int) -> None:
        """Batches up to `step` may be generated (with the weights the engines hold when each starts)."""
        with self._cond:
            self._allowed = max(self._allowed, step)
            self._cond.notify_all()

    def take(self, step: int, timeout: float | None = None) -> T:
        """Batch `step` once generated (removed from the producer); re-raises the producer's failure."""
        with self._cond:
            self._wait(lambda: step in self._ready, f"batch {step}", timeout)
            return self._ready.pop(step)

    def wait_generated(self, step: int, timeout: float | None = None) -> None:
        """Block until batch `step` is generated (or the last step is passed): the weights may change after."""
        if step > self._last:
            step = self._last
        with self._cond:
            self._wait(lambda: step < self._next, f"batch {step}", timeout)

    def pending(self) -> dict[int, T]:
        """Generated and not yet taken batches, by step (what a checkpoint saves)."""
        with self._cond:
            return dict(self._ready)

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to stop after the batch it is generating; join it."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- producer thread ---------------------------------------------------------------------------------------
    def _wait(self, ready: Callable[[], bool], what: str, timeout: float | None) -> None:
        if not self._cond.wait_for(lambda: ready() or self._error is not None, timeout):
            raise TimeoutError(f"asynchronous rollouts: {what} not generated within {timeout}s")
        if not ready():
            raise RuntimeError(f"the rollout producer failed while the trainer waited for {what}") from self._error

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping or self._next <= self._allowed)
                    if self._stopping or self._next > self._last:
                        return
                    step = self._next
                result = self._collect(step)
                with self._cond:
                    self._ready[step] = result
                    self._next = step + 1
                    while self._next in self._ready:
                        self._next += 1
                    self._cond.notify_all()
        except BaseException as error:  # noqa: BLE001 - handed to the trainer thread, which raises it
            with self._cond:
                self._error = error
                self._cond.notify_all()
