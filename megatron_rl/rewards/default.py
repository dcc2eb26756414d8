"""The "default" reward: route each response to its task's verifier by the row's ``data_source``.

Every synthetic task (``megatron_rl.tasks.registry.SYNTHETIC_TASKS``: arithmetic, countdown, chain) goes to
its own verifier under its data_source ``synthetic/<task>``; everything else (DAPO-Math-17k, AIME, MATH ...) to
the math-verify reward. The same idea as verl's ``default_compute_score``. The routing table is derived from the
task table, so a newly registered task is routed without touching this file.
"""
from __future__ import annotations

from megatron_rl.tasks.registry import SYNTHETIC_TASKS
from megatron_rl.rewards.math_reward import math_reward, warm_up

VERIFIERS_BY_DATA_SOURCE = {task.data_source: task.verify for task in SYNTHETIC_TASKS.values()}


def default_reward(response: str, ground_truth: str, data_source: str = "") -> float:
    """The synthetic task's verifier for a ``synthetic/<task>`` data_source, else :func:`math_reward`."""
    verifier = VERIFIERS_BY_DATA_SOURCE.get(data_source)
    if verifier is not None:
        return verifier(response, ground_truth)
    return math_reward(response, ground_truth)


default_reward.warmup = warm_up


def _in_process_safe(response: str, ground_truth: str, data_source: str = "", extra_info=None) -> bool:
    """Synthetic-task items go to their bounded verifiers, which may run in the trainer's process; math-verify items
    (sympy, which can hang) stay in the timeout-guarded workers."""
    return data_source in VERIFIERS_BY_DATA_SOURCE


default_reward.in_process_safe = _in_process_safe
