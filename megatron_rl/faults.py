"""Failure injection for tests: delay, stall, kill or fail a chosen component at a chosen call. Off unless the
environment variable MEGATRON_RL_FAULTS is set; production code only marks the points (`inject("engine.generate")`).

    MEGATRON_RL_FAULTS='[{"point": "actor.train_step", "action": "kill", "rank": 1, "call": 3}]' megatron-rl train ...

Each fault: point (where), action ("delay" | "stall" | "kill" | "raise"), seconds (delay: how long; stall: how long
before giving up, default an hour), rank (only this rank/engine/worker id; null = every process), call (only the
n-th time this process reaches the point, 1-based; null = every time). A "kill" is SIGKILL of the process itself (as
the OOM killer or a failed node would), "stall" sleeps (as a process stuck in a collective or a hung kernel would),
"raise" raises FaultInjected.

Points marked in the code (rank: the Megatron rank, the engine id, or the reward worker's start number):
actor.train_step, actor.compute_log_probs, actor.collective (inside train_step, just before the loss all-reduce, so a
stall there holds the other ranks in a collective), actor.export_weights, actor.prepare_weights (an owner send's
one-time set-up, `ActorGroup.weight_owners`), engine.generate, engine.load_bucket,
reward.score, trainer.step (the driver, before each RL step).

The variable is read once per process (the Ray actors get it through the environment the trainer gives them, see
`propagated_env`). A run that sets it prints a warning, so a fault cannot hide in a production log.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass

ENV = "MEGATRON_RL_FAULTS"
ACTIONS = ("delay", "stall", "kill", "raise")

__all__ = ["ENV", "Fault", "FaultInjected", "inject", "parse_faults", "propagated_env"]


class FaultInjected(RuntimeError):
    """Raised by an injected "raise" fault."""


@dataclass(frozen=True)
class Fault:
    point: str
    action: str
    seconds: float = 0.0
    rank: int | None = None
    call: int | None = None

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"{ENV}: action must be one of {ACTIONS}, got {self.action!r}")
        if self.call is not None and self.call < 1:
            raise ValueError(f"{ENV}: call counts from 1, got {self.call}")


def parse_faults(text: str | None) -> list[Fault]:
    """The faults of a MEGATRON_RL_FAULTS value (a JSON list of objects); [] for None or empty."""
    if not text:
        return []
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ENV} is not valid JSON: {e}") from None
    if not isinstance(items, list):
        raise ValueError(f"{ENV} must be a JSON list of faults, got {type(items).__name__}")
    return [Fault(**item) for item in items]


_faults: list[Fault] | None = None
_calls: Counter = Counter()


def _active() -> list[Fault]:
    global _faults
    if _faults is None:
        _faults = parse_faults(os.environ.get(ENV))
        if _faults:
            print(f"[faults] {ENV} is set in pid {os.getpid()}: {len(_faults)} injected fault(s) (test runs only)",
                  file=sys.stderr, flush=True)
    return _faults


def inject(point: str, *, rank: int | None = None) -> None:
    """Mark a fault point; does nothing unless a fault of MEGATRON_RL_FAULTS matches (point, rank, call count)."""
    faults = _active()
    if not faults:
        return
    _calls[point] += 1
    for fault in faults:
        if fault.point != point or (fault.rank is not None and fault.rank != rank):
            continue
        if fault.call is not None and fault.call != _calls[point]:
            continue
        print(f"[faults] {point} (rank {rank}, call {_calls[point]}): {fault.action} at {time.time():.3f}",
              file=sys.stderr, flush=True)
        if fault.action == "delay":
            time.sleep(fault.seconds)
        elif fault.action == "stall":
            time.sleep(fault.seconds or 3600.0)
        elif fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            raise FaultInjected(f"injected fault at {point} (rank {rank}, call {_calls[point]})")


def propagated_env() -> dict[str, str]:
    """The fault settings to hand to child processes (Ray actors, reward workers): {} when none are set."""
    value = os.environ.get(ENV)
    return {ENV: value} if value else {}
