"""Write synthetic tasks as DAPO-layout parquet/jsonl files, and supervised warm-up (prompt, response) pairs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_rl.tasks.registry import generate_examples


@dataclass(frozen=True)
class SftPair:
    """A supervised warm-up example: chat messages of the prompt and the reference response."""

    messages: list[dict[str, str]]
    response: str


def write_synthetic_dataset(path: str | Path, task: str, num_examples: int, seed: int = 0, difficulty: int = 1,
                            split: str = "train") -> Path:
    """Generate ``num_examples`` and write them in the DAPO layout to ``path`` (.parquet, .jsonl or .json).

    The file loads with :func:`megatron_rl.data.build_prompt_dataset` like DAPO-Math-17k; each row's
    ``extra_info.reference_response`` is the warm-up target. Use different seeds for train and validation files.
    """
    import datasets

    path = Path(path)
    rows = [example.to_row(index, split) for index, example in
            enumerate(generate_examples(task, num_examples, seed, difficulty))]
    table = datasets.Dataset.from_list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        table.to_parquet(str(path))
    elif path.suffix in (".jsonl", ".json"):
        table.to_json(str(path), lines=True, force_ascii=False)
    else:
        raise ValueError(f"synthetic dataset path must end in .parquet, .jsonl or .json, got {str(path)!r}")
    return path


def sft_pairs(task: str, num_examples: int, seed: int = 0, difficulty: int = 1) -> list[SftPair]:
    """Warm-up pairs from the same generator as the RL prompts (pick a seed the RL/validation files do not use)."""
    return [SftPair([{"role": "user", "content": example.prompt}], example.reference_response)
            for example in generate_examples(task, num_examples, seed, difficulty)]
