"""One generated task instance, and its row in the DAPO-Math-17k parquet layout (so one loader serves all data)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SyntheticExample:
    """prompt: the user message; ground_truth: what the verifier checks against; reference_response: a correct
    response in the expected format (the supervised warm-up target)."""

    task: str
    difficulty: int
    prompt: str
    ground_truth: str
    reference_response: str

    @property
    def data_source(self) -> str:
        return f"synthetic/{self.task}"

    def to_row(self, index: int, split: str = "train") -> dict[str, Any]:
        """The example as a DAPO-layout row: prompt = chat messages, ground truth under reward_model."""
        return {
            "data_source": self.data_source,
            "prompt": [{"role": "user", "content": self.prompt}],
            "ability": self.task,
            "reward_model": {"style": "rule", "ground_truth": self.ground_truth},
            "extra_info": {
                "index": index,
                "split": split,
                "difficulty": self.difficulty,
                "reference_response": self.reference_response,
            },
        }


def task_rng(task: str, seed: int, difficulty: int) -> random.Random:
    """The generator's random stream: a function of (task, seed, difficulty) only, the same on every platform
    (string seeds are hashed with SHA-512 by ``random.Random``, not with the salted ``hash()``)."""
    return random.Random(f"megatron_rl/{task}/difficulty={difficulty}/seed={seed}")


def check_difficulty(task: str, difficulty: int, levels: dict) -> None:
    if difficulty not in levels:
        raise ValueError(f"{task}: difficulty must be one of {sorted(levels)}, got {difficulty!r}")
