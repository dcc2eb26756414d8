"""The synthetic task table: name -> generator, verifier, difficulty levels and data_source."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron_rl.tasks import arithmetic, chain, countdown
from megatron_rl.tasks.example import SyntheticExample


@dataclass(frozen=True)
class SyntheticTask:
    name: str
    generate: Callable[[int, int, int], list[SyntheticExample]]  # (num_examples, seed, difficulty)
    verify: Callable[[str, str], float]  # (response, ground_truth) -> reward
    levels: dict

    @property
    def data_source(self) -> str:
        return f"synthetic/{self.name}"


SYNTHETIC_TASKS: dict[str, SyntheticTask] = {
    task.name: task
    for task in (
        SyntheticTask(arithmetic.TASK, arithmetic.generate_arithmetic, arithmetic.arithmetic_reward,
                      arithmetic.ARITHMETIC_LEVELS),
        SyntheticTask(countdown.TASK, countdown.generate_countdown, countdown.countdown_reward,
                      countdown.COUNTDOWN_LEVELS),
        SyntheticTask(chain.TASK, chain.generate_chain, chain.chain_reward, chain.CHAIN_LEVELS),
    )
}


def get_task(name: str) -> SyntheticTask:
    if name not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; available: {', '.join(sorted(SYNTHETIC_TASKS))}")
    return SYNTHETIC_TASKS[name]


def generate_examples(task: str, num_examples: int, seed: int = 0, difficulty: int = 1) -> list[SyntheticExample]:
    """``num_examples`` examples of ``task``; the same (task, seed, difficulty) always gives the same list."""
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    return get_task(task).generate(num_examples, seed, difficulty)
