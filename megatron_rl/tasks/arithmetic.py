"""Multi-digit arithmetic: "What is 3+4?" -> "Answer: 7", with a difficulty knob and a tolerant verifier.

Level 1 (single-digit addition, 100 distinct problems, one- or two-digit answers) is meant to be learnable by a
tiny randomly initialised model after a short supervised warm-up, so the CPU quickstart can show RL improving
validation accuracy. Each further level widens the operands or adds operators (``ARITHMETIC_LEVELS``).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.tasks.example import SyntheticExample, check_difficulty, task_rng
from megatron_rl.tasks.expression import evaluate_expression, parse_number
from megatron_rl.tasks.extraction import extract_answer_segment

TASK = "arithmetic"


@dataclass(frozen=True)
class ArithmeticLevel:
    """Operands are drawn from [0, max_operand]; the right operand of ``*`` from [0, max_factor]. Without
    allow_negative a two-operand subtraction puts the larger operand first, so the answer is never negative."""

    operators: str
    max_operand: int
    max_factor: int = 9
    num_operands: int = 2
    allow_negative: bool = False


ARITHMETIC_LEVELS: dict[int, ArithmeticLevel] = {
    1: ArithmeticLevel("+", 9),                 # 3+4
    2: ArithmeticLevel("+-", 9),                # 9-4
    3: ArithmeticLevel("+-", 99),               # 57+38
    4: ArithmeticLevel("+-*", 99, max_factor=9),    # 57*8
    5: ArithmeticLevel("+-*", 999, max_factor=99),  # 457*38
    6: ArithmeticLevel("+-*", 99, max_factor=9, num_operands=3, allow_negative=True),  # 12-45*3
}


def _one_problem(rng, level: ArithmeticLevel) -> str:
    operators = [rng.choice(level.operators) for _ in range(level.num_operands - 1)]
    operands = [rng.randint(0, level.max_operand)]
    for operator in operators:
        operands.append(rng.randint(0, level.max_factor if operator == "*" else level.max_operand))
    if level.num_operands == 2 and operators[0] == "-" and not level.allow_negative and operands[0] < operands[1]:
        operands.reverse()
    text = str(operands[0])
    for operator, operand in zip(operators, operands[1:]):
        text += f"{operator}{operand}"
    return text


def generate_arithmetic(num_examples: int, seed: int = 0, difficulty: int = 1) -> list[SyntheticExample]:
    """``num_examples`` problems, a pure function of (seed, difficulty)."""
    check_difficulty(TASK, difficulty, ARITHMETIC_LEVELS)
    rng = task_rng(TASK, seed, difficulty)
    examples = []
    for _ in range(num_examples):
        expression = _one_problem(rng, ARITHMETIC_LEVELS[difficulty])
        value = evaluate_expression(expression)
        assert value.denominator == 1, expression  # no division in these levels
        answer = str(value.numerator)
        examples.append(SyntheticExample(TASK, difficulty, f"What is {expression}?", answer, f"Answer: {answer}"))
    return examples


def arithmetic_reward(response: str, ground_truth: str) -> float:
    """1.0 when the response's final answer is the number ``ground_truth``, else 0.0.

    Tolerant of format: "Answer: 7", "answer:7.", "\\boxed{7}", "The answer is 7", "3+4=7", "7", "7.0" all count;
    a hedge ("Answer: 7 or 8") or a bare restatement of the question does not.
    """
    segment = extract_answer_segment(response)
    if segment is None:
        return 0.0
    answer = parse_number(segment.rsplit("=", 1)[-1])
    expected = parse_number(ground_truth)
    if expected is None:
        raise ValueError(f"arithmetic ground truth must be a number, got {ground_truth[:40]!r}")
    return float(answer is not None and answer == expected)


# Bounded pure-Python string and integer/Fraction work (no sympy, no regex backtracking on unbounded input): the
# reward pool may call it in the trainer's own process instead of a worker (megatron_rl/rewards/pool.py, in_process).
arithmetic_reward.in_process_safe = True
