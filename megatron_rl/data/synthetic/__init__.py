"""Synthetic verifiable tasks that need no download: seeded generators with a difficulty knob, and verifiers.

    examples = generate_examples("arithmetic", num_examples=1000, seed=0, difficulty=1)
    write_synthetic_dataset("train.parquet", "arithmetic", 1000, seed=0, difficulty=1)   # DAPO layout
    python -m megatron_rl.data.synthetic --task countdown --difficulty 2 --num-examples 500 --out val.jsonl
"""
from __future__ import annotations

from megatron_rl.data.synthetic.arithmetic import ARITHMETIC_LEVELS, arithmetic_reward, generate_arithmetic
from megatron_rl.data.synthetic.countdown import COUNTDOWN_LEVELS, countdown_reward, generate_countdown
from megatron_rl.data.synthetic.example import SyntheticExample
from megatron_rl.data.synthetic.export import SftPair, sft_pairs, write_synthetic_dataset
from megatron_rl.data.synthetic.tasks import SYNTHETIC_TASKS, SyntheticTask, generate_examples, get_task

__all__ = [
    "ARITHMETIC_LEVELS", "COUNTDOWN_LEVELS", "SYNTHETIC_TASKS", "SftPair", "SyntheticExample", "SyntheticTask",
    "arithmetic_reward", "countdown_reward", "generate_arithmetic", "generate_countdown", "generate_examples",
    "get_task", "sft_pairs", "write_synthetic_dataset",
]
