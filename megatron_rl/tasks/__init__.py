"""Synthetic verifiable tasks that need no download: each task's seeded generator (with a difficulty knob) and its
verifier live together, plus the answer extraction they and the math reward share. Pure Python (no torch).

    from megatron_rl.tasks import generate_examples, get_task
    examples = generate_examples("arithmetic", num_examples=1000, seed=0, difficulty=1)
    reward = get_task("arithmetic").verify("Answer: 7", "7")     # 1.0

Writing them as dataset files is `megatron_rl.data.synthetic` (`python -m megatron_rl.data.synthetic --help`); the
"default" reward routes each row to its task's verifier by `data_source` (`megatron_rl.rewards.default`).
"""
from megatron_rl.tasks.arithmetic import ARITHMETIC_LEVELS, arithmetic_reward, generate_arithmetic
from megatron_rl.tasks.chain import CHAIN_LEVELS, chain_reward, generate_chain
from megatron_rl.tasks.countdown import COUNTDOWN_LEVELS, countdown_reward, generate_countdown
from megatron_rl.tasks.example import SyntheticExample
from megatron_rl.tasks.registry import SYNTHETIC_TASKS, SyntheticTask, generate_examples, get_task

__all__ = [
    "ARITHMETIC_LEVELS", "CHAIN_LEVELS", "COUNTDOWN_LEVELS", "SYNTHETIC_TASKS", "SyntheticExample", "SyntheticTask",
    "arithmetic_reward", "chain_reward", "countdown_reward", "generate_arithmetic", "generate_chain",
    "generate_countdown", "generate_examples", "get_task",
]
