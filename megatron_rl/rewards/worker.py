"""The reward worker process: imports the reward function once, then scores one item at a time.

Each call runs in the worker's *main thread* under a soft timeout: ``setitimer(ITIMER_REAL)`` delivers SIGALRM
and the handler raises :class:`SoftTimeout` (a BaseException, so a reward's ``except Exception`` cannot swallow
it). That interrupts anything that returns to the Python interpreter (sympy's ``9^{9^{9^9}}`` does) without
losing the worker. Code stuck where signals are not handled (inside one long C call, or with SIGALRM blocked or
its timer reset by the reward itself) is the parent's job: it kills the process at timeout + grace and starts
another (see pool.py).

Started as ``python -m megatron_rl.rewards.worker FD`` (see pool.py), so it imports only the reward function --
never the trainer's main script, torch or Ray. Protocol on the socket FD: parent -> (spec, fn_kwargs, timeout_s,
parent_pid); worker -> ("ready", pid) | ("init_error", traceback); then parent -> (task_id, item) | None and
worker -> (task_id, status, score, message, seconds) with status "ok" | "timeout" | "error".
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
import traceback
from multiprocessing.connection import Connection

from megatron_rl.faults import inject
from megatron_rl.rewards.registry import RewardFunction, check_score, resolve_reward_fn

_PR_SET_PDEATHSIG = 1
_armed = False
# This worker's start number in its pool (0, 1, ... and on for replacements): the fault-injection rank.
_WORKER_ID = int(os.environ.get("MEGATRON_RL_REWARD_WORKER_ID", "-1"))


class SoftTimeout(BaseException):
    """Raised in the worker's main thread when a reward call runs past its timeout."""


def _on_alarm(signum, frame):
    if _armed:
        raise SoftTimeout()


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when its parent dies, even mid-call: no orphan reward workers.

    (The kernel ties this to the parent *thread* that started the worker: create the pool in a long-lived thread.)
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):  # not Linux: the pipe EOF still ends an idle worker
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def score_one(reward: RewardFunction, item: tuple, timeout_s: float | None) -> tuple[str, float, str, float]:
    """(status, score, message, seconds) of one reward call under the soft timeout; never raises.

    timeout_s None: no timer, for the pool's in-process scoring of functions declared bounded (``in_process_safe``);
    it may run outside the main thread, where SIGALRM cannot be used, and lets Ctrl-C through."""
    global _armed
    start = time.perf_counter()
    try:
        if timeout_s is None:
            value = reward(*item)
        else:
            try:
                _armed = True
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
                value = reward(*item)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                _armed = False
        return "ok", check_score(value), "", time.perf_counter() - start
    except SoftTimeout:
        return "timeout", 0.0, f"timed out after {timeout_s:g}s", time.perf_counter() - start
    except BaseException as error:  # noqa: BLE001 - a reward must never take its worker down
        if timeout_s is None and not isinstance(error, Exception):
            raise  # KeyboardInterrupt / SystemExit in the trainer's process are the trainer's
        return "error", 0.0, _describe(error), time.perf_counter() - start


def _describe(error: BaseException) -> str:
    try:
        text = str(error)
    except BaseException:  # noqa: BLE001
        text = "<unprintable>"
    return f"{type(error).__name__}: {text[:300]}"


def worker_main(conn: Connection) -> None:
    """Serve reward calls on ``conn`` until the parent sends None or goes away."""
    spec, fn_kwargs, timeout_s, parent_pid = conn.recv()
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes the pool
    try:
        reward = resolve_reward_fn(spec, fn_kwargs)
        warmup = getattr(reward.fn, "warmup", None)
        if callable(warmup):
            warmup()
    except BaseException:  # noqa: BLE001
        conn.send(("init_error", traceback.format_exc()))
        return
    signal.signal(signal.SIGALRM, _on_alarm)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
            if message is None:
                return
            task_id, item = message
            inject("reward.score", rank=_WORKER_ID)
            conn.send((task_id, *score_one(reward, item, timeout_s)))
        except (EOFError, OSError):  # the parent is gone
            return


def run(fd: int) -> None:
    """The worker process's entry (`RewardPool` starts ``python -c`` calling this with its socket's descriptor; not
    ``-m`` this module, which the package's own import of it makes runpy warn about)."""
    from megatron_rl.process_exit import exit_process

    worker_main(Connection(fd))
    exit_process(0)


if __name__ == "__main__":
    run(int(sys.argv[1]))
