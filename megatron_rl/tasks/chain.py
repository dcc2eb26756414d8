"""Chain sums: "What is 7+5+8?" answered either with a short worked chain or directly, so response length can vary.

The reference responses mix two styles (``ChainLevel.worked_fraction`` of them worked):

    worked: "7+5=12. 12+8=20. Answer: 20"     (one partial sum per operator, ~4-5 tokens each)
    direct: "Answer: 20"

Both are correct, so a supervised warm-up on them gives a policy whose response-length distribution is bimodal
(~3 vs ~16 tokens for three operands) and the RL objective decides which style grows. This is the miniature of
the length dynamics the LUSPO paper (arXiv 2602.05261) reports: GSPO's per-sequence averaging gives a long
response's tokens less weight than a short one's, LUSPO multiplies each sequence's loss by its length to remove
that bias. (The single-digit ``arithmetic`` task cannot show it: its answers are always ~4 tokens.)

The verifier checks only the final number (``arithmetic_reward``: "Answer: 20", or the last "= 20" of a chain cut
before its "Answer:" line); the partial sums are not graded.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.tasks.arithmetic import arithmetic_reward
from megatron_rl.tasks.example import SyntheticExample, check_difficulty, task_rng

TASK = "chain"


@dataclass(frozen=True)
class ChainLevel:
    """``num_operands`` operands from [0, max_operand], joined by operators drawn from ``operators`` (a running
    total never goes negative: a "-" whose operand exceeds the total becomes "+"). ``worked_fraction`` of the
    reference responses show the partial sums."""

    num_operands: int
    max_operand: int = 9
    operators: str = "+"
    worked_fraction: float = 0.5


CHAIN_LEVELS: dict[int, ChainLevel] = {
    1: ChainLevel(3),                  # 7+5+8: worked ~16 tokens, direct ~3
    2: ChainLevel(4),                  # 7+5+8+2: worked ~21 tokens
    3: ChainLevel(3, operators="+-"),  # 7+5-8
    4: ChainLevel(4, operators="+-"),
    5: ChainLevel(3, worked_fraction=0.2),  # mostly direct at the start: can RL discover the chain?
    6: ChainLevel(3, worked_fraction=0.8),  # mostly worked at the start: does it collapse to direct answers?
}


def _one_problem(rng, level: ChainLevel) -> tuple[str, list[str], int]:
    """(expression, partial-sum steps, value)."""
    total = rng.randint(0, level.max_operand)
    expression, steps = str(total), []
    for _ in range(level.num_operands - 1):
        operand = rng.randint(0, level.max_operand)
        operator = rng.choice(level.operators)
        if operator == "-" and operand > total:
            operator = "+"
        new_total = total + operand if operator == "+" else total - operand
        steps.append(f"{total}{operator}{operand}={new_total}")
        expression += f"{operator}{operand}"
        total = new_total
    return expression, steps, total


def generate_chain(num_examples: int, seed: int = 0, difficulty: int = 1) -> list[SyntheticExample]:
    """``num_examples`` problems, a pure function of (seed, difficulty); each reference response is worked with
    probability ``worked_fraction`` (drawn from the same seeded stream)."""
    check_difficulty(TASK, difficulty, CHAIN_LEVELS)
    level = CHAIN_LEVELS[difficulty]
    rng = task_rng(TASK, seed, difficulty)
    examples = []
    for _ in range(num_examples):
        expression, steps, value = _one_problem(rng, level)
        worked = rng.random() < level.worked_fraction
        reference = (". ".join(steps) + f". Answer: {value}") if worked else f"Answer: {value}"
        examples.append(SyntheticExample(TASK, difficulty, f"What is {expression}?", str(value), reference))
    return examples


def chain_reward(response: str, ground_truth: str) -> float:
    """1.0 when the final answer is the number ``ground_truth`` (see ``arithmetic_reward``), else 0.0."""
    return arithmetic_reward(response, ground_truth)


# Bounded pure-Python string and integer/Fraction work (no sympy, no regex backtracking on unbounded input): the
# reward pool may call it in the trainer's own process instead of a worker (megatron_rl/rewards/pool.py, in_process).
chain_reward.in_process_safe = True
