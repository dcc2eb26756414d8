"""A process pool that scores responses with a per-call timeout and never lets one response stall training.

    with RewardPool("math", num_workers=4, timeout_s=10) as pool:
        scores, metrics = pool.score([RewardItem(response, ground_truth), ...])   # or (response, gt) tuples

Every item gets a score: a reward that raises, returns garbage or times out scores 0.0 and is counted in the
returned :class:`RewardMetrics` (``reward/num_errors``, ``reward/num_timeouts``) and logged once per call.

Timeouts are enforced twice. In the worker, a soft SIGALRM timeout interrupts any Python-level work after
``timeout_s`` (see worker.py); here, a worker still busy ``kill_grace_s`` later (stuck in C code, signals blocked)
is SIGKILLed and replaced. A worker that dies (segfault, OOM killer) is replaced too; the item it was running is
retried once on another worker and is a reward error if it kills that one as well. Why processes and not threads: math-verify/sympy hold the GIL and cannot be
interrupted from another thread, and math-verify's own signal timeouts raise ValueError outside a main thread.

Workers are fresh interpreters (``python -c`` running ``megatron_rl.rewards.worker.run``): not forked (forking a trainer that
holds torch/Ray threads can deadlock) and not multiprocessing "spawn" children (those re-import the caller's main
script, torch and all, and fail in a script without an ``if __name__ == "__main__"`` guard). They get the parent's
``sys.path``, ask the kernel to kill them if the parent dies (PR_SET_PDEATHSIG), and are shut down by ``close()``
(also on ``with`` exit, garbage collection and interpreter exit): no orphans.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

from megatron_rl.rewards.registry import resolve_reward_fn
from megatron_rl.rewards.worker import score_one
from megatron_rl.rewards.types import RewardItem, RewardMetrics

logger = logging.getLogger(__name__)


# A worker that dies before it is ready this many times in a row means the environment is broken.
MAX_STARTUP_DEATHS = 3


class RewardPoolError(RuntimeError):
    """The pool itself cannot work (a worker cannot start): not a per-item reward failure."""


class _Worker:
    """One worker process, its socket and the task it is running (at most one at a time)."""

    def __init__(self, spec: str, fn_kwargs: dict, timeout_s: float, worker_id: int = -1):
        parent_end, child_end = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path or os.getcwd() for path in sys.path),
                   MEGATRON_RL_REWARD_WORKER_ID=str(worker_id))
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from megatron_rl.rewards.worker import run; run(int(sys.argv[1]))",
             str(child_end.fileno())],
            pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL, env=env,
        )
        child_end.close()  # so that the worker's death reads as EOF here
        self.conn = Connection(parent_end.detach())
        self.conn.send((spec, fn_kwargs, timeout_s, os.getpid()))
        self.started_at = time.monotonic()
        self.ready = False
        self.task: int | None = None
        self.assigned_at = math.inf
        self.deadline = math.inf

    def assign(self, task: int, payload: tuple, hard_timeout_s: float) -> None:
        self.task, self.assigned_at = task, time.monotonic()
        self.deadline = self.assigned_at + hard_timeout_s
        self.conn.send((task, payload))

    def release(self) -> None:
        self.task, self.assigned_at, self.deadline = None, math.inf, math.inf

    def alive(self) -> bool:
        return self.process.poll() is None

    def ask_to_exit(self) -> bool:
        """Ask an idle worker to exit (it finishes on its own); False when it is busy or gone."""
        if not (self.alive() and self.task is None):
            return False
        try:
            self.conn.send(None)
        except OSError:
            return False
        return True

    def stop(self, join_s: float = 2.0, asked: bool = False) -> None:
        """Ask an idle worker to exit (unless `asked` already), kill it if it has not within join_s, and reap it."""
        if asked or self.ask_to_exit():
            try:
                self.process.wait(join_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self, exit_wait_s: float = 0.0) -> int:
        """Kill (after ``exit_wait_s`` for a worker already on its way out), reap, and return the exit code."""
        if exit_wait_s and self.alive():
            try:
                self.process.wait(exit_wait_s)
            except subprocess.TimeoutExpired:
                pass
        if self.alive():
            self.process.kill()
        self.conn.close()
        return self.process.wait()


def _kill_processes(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


class RewardPool:
    """Score (response, ground truth) pairs in ``num_workers`` processes with a per-call timeout.

    reward_fn: a built-in name (``BUILTIN_REWARDS``: "default", "math", "format", "arithmetic", "countdown",
      "chain"), an import path "package.module:function", or a module-level function; validated here, before any
      worker starts.
    fn_kwargs: options bound to every call (e.g. {"extraction": "lenient"} for "math").
    timeout_s: per-call soft timeout; kill_grace_s: extra time before a stuck worker is killed and replaced.
    startup_timeout_s: a worker that is not ready after this long is a RewardPoolError (broken environment).
    in_process: "auto" scores the items the reward function declares safe (``in_process_safe``: bounded pure-Python
      verifiers such as the synthetic tasks') in the calling process, saving the round trip to a worker; "never"
      sends every item to the workers. Scores and metrics are the same either way.
    """

    def __init__(
        self,
        reward_fn: str | Callable[..., Any] = "default",
        num_workers: int = 2,
        timeout_s: float = 10.0,
        *,
        fn_kwargs: dict[str, Any] | None = None,
        kill_grace_s: float = 1.0,
        startup_timeout_s: float = 120.0,
        in_process: str = "auto",
    ):
        if num_workers < 1:
            raise ValueError(f"reward num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"reward timeout_s must be > 0, got {timeout_s}")
        if kill_grace_s < 0:
            raise ValueError(f"reward kill_grace_s must be >= 0, got {kill_grace_s}")
        if in_process not in ("auto", "never"):
            raise ValueError(f"reward in_process must be 'auto' or 'never', got {in_process!r}")
        self.in_process = in_process
        self.reward = resolve_reward_fn(reward_fn, fn_kwargs)
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.kill_grace_s = float(kill_grace_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self._lock = threading.Lock()
        self._closed = False
        self._startup_deaths = 0
        self._processes: list = []  # every process ever started; the finalizer kills the live ones
        self._started = 0  # workers started so far (their ids)
        self._finalizer = weakref.finalize(self, _kill_processes, self._processes)
        self._workers = [self._start_worker() for _ in range(num_workers)]

    def _start_worker(self) -> _Worker:
        worker = _Worker(self.reward.spec, self.reward.fn_kwargs, self.timeout_s, worker_id=self._started)
        self._started += 1
        self._processes[:] = [p for p in self._processes if p.poll() is None] + [worker.process]
        return worker

    @property
    def worker_pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    def score(self, items: Sequence[RewardItem | tuple[str, str]]) -> tuple[list[float], RewardMetrics]:
        """Scores in the order of ``items`` and the metrics of this call. Never raises for a bad response."""
        payloads = [_payload(index, item) for index, item in enumerate(items)]
        with self._lock:
            if self._closed:
                raise RewardPoolError("RewardPool.score called after close() or after a RewardPoolError")
            started = time.perf_counter()
            try:
                scores, metrics = self._score_all(payloads)
            except BaseException:  # a broken pool, or Ctrl-C mid-batch: tasks are in flight, stop everything
                self._shutdown()
                raise
            metrics.wall_s = time.perf_counter() - started
        if metrics.num_timeouts or metrics.num_errors:
            logger.warning(
                "reward %s: %d of %d calls timed out and %d failed (scored 0); first: %s",
                self.reward.spec, metrics.num_timeouts, metrics.num_items, metrics.num_errors,
                metrics.problem_examples[0] if metrics.problem_examples else "",
            )
        return scores, metrics

    def _score_all(self, payloads: list[tuple]) -> tuple[list[float], RewardMetrics]:
        """In-process items first (see in_process), then the rest on the workers; scores in item order."""
        inline = [i for i, p in enumerate(payloads) if self.in_process == "auto" and self.reward.in_process_safe(*p)]
        if not inline:
            return self._run(payloads)
        remote = sorted(set(range(len(payloads))) - set(inline))
        scores = [0.0] * len(payloads)
        metrics = RewardMetrics(num_items=len(inline))
        for i in inline:
            status, score, message, seconds = score_one(self.reward, payloads[i], None)
            scores[i] = score
            metrics.max_call_s = max(metrics.max_call_s, seconds)
            if status == "ok":
                metrics.score_sum += score
            else:
                metrics.num_errors += 1
                metrics.record_problem(f"item {i} ({status}): {message}; response starts {payloads[i][0][:80]!r}")
        if remote:
            remote_scores, remote_metrics = self._run([payloads[i] for i in remote])
            for i, score in zip(remote, remote_scores):
                scores[i] = score
            metrics = metrics.merge(remote_metrics)
        return scores, metrics

    def _run(self, payloads: list[tuple]) -> tuple[list[float], RewardMetrics]:
        metrics = RewardMetrics(num_items=len(payloads))
        scores = [0.0] * len(payloads)
        pending = deque(range(len(payloads)))
        remaining = len(payloads)
        retried: set[int] = set()  # items whose worker died under them once already

        def finish(worker: _Worker, status: str, score: float, message: str, seconds: float) -> None:
            nonlocal remaining
            task = worker.task
            worker.release()
            remaining -= 1
            metrics.max_call_s = max(metrics.max_call_s, seconds)
            if status == "ok":
                scores[task] = score
                metrics.score_sum += score
                return
            if status == "timeout":
                metrics.num_timeouts += 1
            else:
                metrics.num_errors += 1
            metrics.record_problem(f"item {task} ({status}): {message}; response starts "
                                   f"{payloads[task][0][:80]!r}")

        while remaining:
            for worker in list(self._workers):
                if worker.ready and worker.task is None and pending:
                    if not worker.alive():  # died while idle (OOM killer, ...): nothing of ours was lost
                        self._replace(worker, metrics)
                        continue
                    task = pending.popleft()
                    try:
                        worker.assign(task, payloads[task], self.timeout_s + self.kill_grace_s)
                    except OSError:  # died just now: the task never reached it
                        worker.release()
                        pending.appendleft(task)
                        self._replace(worker, metrics)
            waiting = [w for w in self._workers if not w.ready or w.task is not None]
            deadline = min([w.deadline for w in waiting] +
                           [w.started_at + self.startup_timeout_s for w in waiting if not w.ready])
            for conn in wait([w.conn for w in waiting], timeout=max(0.0, deadline - time.monotonic())):
                worker = next(w for w in self._workers if w.conn is conn)
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    self._on_worker_death(worker, metrics, finish, pending, retried)
                    continue
                if message[0] == "ready":
                    worker.ready = True
                    self._startup_deaths = 0
                elif message[0] == "init_error":
                    raise RewardPoolError(f"reward worker could not load {self.reward.spec!r}:\n{message[1]}")
                else:
                    task, status, score, text, seconds = message
                    assert task == worker.task, f"reward worker answered task {task}, expected {worker.task}"
                    finish(worker, status, score, text, seconds)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.task is not None and now >= worker.deadline:
                    self._replace(worker, metrics)
                    finish(worker, "timeout", 0.0, f"still running {now - worker.assigned_at:.1f}s after start "
                           f"(timeout_s + kill_grace_s): worker killed and replaced", now - worker.assigned_at)
                elif not worker.ready and now - worker.started_at > self.startup_timeout_s:
                    raise RewardPoolError(f"a reward worker for {self.reward.spec!r} was not ready after "
                                          f"{self.startup_timeout_s:g}s (startup_timeout_s)")
        return scores, metrics

    def _on_worker_death(self, worker: _Worker, metrics: RewardMetrics, finish, pending: deque,
                         retried: set[int]) -> None:
        """A worker's socket closed: replace the worker. An item it was running is retried once on another
        worker (the death may have come from outside: the OOM killer, an operator); if it kills a worker again
        it is a reward error."""
        exit_code = worker.kill(exit_wait_s=1.0)
        task = worker.task
        if task is None:
            self._startup_deaths += 0 if worker.ready else 1
            if self._startup_deaths >= MAX_STARTUP_DEATHS:
                raise RewardPoolError(f"reward workers for {self.reward.spec!r} died during start-up "
                                      f"{self._startup_deaths} times in a row (last exit code {exit_code}); see "
                                      f"their stderr above")
            self._replace(worker, metrics)
        elif task not in retried:
            retried.add(task)
            worker.release()
            pending.appendleft(task)
            self._replace(worker, metrics)
        else:
            self._replace(worker, metrics)
            finish(worker, "error", 0.0, f"worker process died twice on this item (exit code {exit_code})",
                   time.monotonic() - worker.assigned_at)

    def _replace(self, worker: _Worker, metrics: RewardMetrics) -> None:
        worker.kill()
        metrics.num_worker_restarts += 1
        self._workers[self._workers.index(worker)] = self._start_worker()

    def close(self) -> None:
        """Stop every worker (graceful, then SIGKILL) and reap it. Idempotent."""
        with self._lock:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        asked = [worker.ask_to_exit() for worker in self._workers]  # all at once: their exits overlap
        for worker, was_asked in zip(self._workers, asked):
            worker.stop(asked=was_asked)
        self._finalizer()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _payload(index: int, item: RewardItem | tuple[str, str]) -> tuple:
    """(response, ground_truth, data_source, extra_info), checked here so a data bug fails loudly and early."""
    if isinstance(item, tuple):
        if len(item) != 2:
            raise TypeError(f"reward item {index}: a tuple must be (response, ground_truth), got {len(item)} fields")
        item = RewardItem(*item)
    if not isinstance(item, RewardItem):
        raise TypeError(f"reward item {index}: expected RewardItem or (response, ground_truth), got {type(item).__name__}")
    if not isinstance(item.response, str) or not isinstance(item.ground_truth, str):
        raise TypeError(f"reward item {index}: response and ground_truth must be str, got "
                        f"{type(item.response).__name__} and {type(item.ground_truth).__name__}")
    return item.response, item.ground_truth, item.data_source, item.extra_info
