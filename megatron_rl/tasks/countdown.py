"""Countdown: reach a target from given numbers with + - * /, each number used exactly once.

"Use 3, 5, 2 once each with + - * / to make 16." -> "Answer: (3+5)*2". The ground truth is a JSON string
``{"target": 16, "numbers": [3, 5, 2]}``; the verifier evaluates the answer exactly (``Fraction``, no ``eval``)
and checks the numbers used. This is the Countdown task popularised for small-model RL by TinyZero
(github.com/Jiayi-Pan/TinyZero), with a difficulty knob (``COUNTDOWN_LEVELS``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction

from megatron_rl.tasks.example import SyntheticExample, check_difficulty, task_rng
from megatron_rl.tasks.expression import ExpressionError, evaluate_expression, expression_literals
from megatron_rl.tasks.extraction import extract_answer_segment

TASK = "countdown"
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3
_MAX_TRIES = 1000


@dataclass(frozen=True)
class CountdownLevel:
    """``num_numbers`` numbers from [1, max_number]; the target is a positive integer <= max_target."""

    num_numbers: int
    max_number: int
    operators: str
    max_target: int = 1000


COUNTDOWN_LEVELS: dict[int, CountdownLevel] = {
    1: CountdownLevel(2, 9, "+"),       # 3, 5 -> 8
    2: CountdownLevel(2, 9, "+-*"),     # 3, 5 -> 15
    3: CountdownLevel(3, 9, "+-*"),
    4: CountdownLevel(3, 20, "+-*/"),
    5: CountdownLevel(4, 25, "+-*/"),
    6: CountdownLevel(4, 99, "+-*/", max_target=100),  # TinyZero's setting
}


def _combine(left: tuple[str, Fraction, int], right: tuple[str, Fraction, int], operator: str):
    """(text, value, precedence) of ``left operator right`` with the parentheses the precedence needs."""
    precedence = _PRECEDENCE[operator]
    left_text = left[0] if left[2] >= precedence else f"({left[0]})"
    tight = precedence + (1 if operator in "-/" else 0)  # a-(b-c), a/(b*c)
    right_text = right[0] if right[2] >= tight else f"({right[0]})"
    value = {"+": left[1] + right[1], "-": left[1] - right[1], "*": left[1] * right[1]}.get(operator)
    if operator == "/":
        value = left[1] / right[1]
    return f"{left_text}{operator}{right_text}", value, precedence


def _one_puzzle(rng, level: CountdownLevel) -> tuple[list[int], str, int]:
    for _ in range(_MAX_TRIES):
        numbers = [rng.randint(1, level.max_number) for _ in range(level.num_numbers)]
        terms = [(str(n), Fraction(n), _ATOM) for n in numbers]
        while len(terms) > 1:
            left = terms.pop(rng.randrange(len(terms)))
            right = terms.pop(rng.randrange(len(terms)))
            operator = rng.choice(level.operators)
            if operator == "-" and left[1] < right[1]:
                left, right = right, left
            if operator == "/" and (right[1] == 0 or (left[1] / right[1]).denominator != 1):
                operator = "*" if "*" in level.operators else "+"
            terms.append(_combine(left, right, operator))
        text, value, _ = terms[0]
        if value.denominator == 1 and 1 <= value <= level.max_target:
            return numbers, text, int(value)
    raise RuntimeError(f"countdown: no valid puzzle in {_MAX_TRIES} tries for {level}")  # not reached in practice


def generate_countdown(num_examples: int, seed: int = 0, difficulty: int = 1) -> list[SyntheticExample]:
    """``num_examples`` puzzles, a pure function of (seed, difficulty); each is solvable (reference solution)."""
    check_difficulty(TASK, difficulty, COUNTDOWN_LEVELS)
    level = COUNTDOWN_LEVELS[difficulty]
    rng = task_rng(TASK, seed, difficulty)
    examples = []
    for _ in range(num_examples):
        numbers, solution, target = _one_puzzle(rng, level)
        prompt = f"Use {', '.join(map(str, numbers))} once each with {' '.join(level.operators)} to make {target}."
        ground_truth = json.dumps({"target": target, "numbers": numbers})
        examples.append(SyntheticExample(TASK, difficulty, prompt, ground_truth, f"Answer: {solution}"))
    return examples


def parse_countdown_ground_truth(ground_truth: str) -> tuple[int, list[int]]:
    try:
        data = json.loads(ground_truth)
        return int(data["target"]), sorted(int(n) for n in data["numbers"])
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f'countdown ground truth must be JSON {{"target": int, "numbers": [int, ...]}}, '
                         f"got {ground_truth[:60]!r}") from error


def countdown_reward(response: str, ground_truth: str) -> float:
    """1.0 when the final answer is an expression using each given number exactly once whose value is the target.

    The answer may be written "Answer: (3+5)*2", "\\boxed{(3+5)*2}", "(3+5)*2 = 16" or "16 = (3+5)*2": every side
    of an "=" must evaluate to the target, and one side must use exactly the given numbers.
    """
    target, numbers = parse_countdown_ground_truth(ground_truth)
    segment = extract_answer_segment(response)
    if segment is None:
        return 0.0
    uses_all_numbers = False
    for side in segment.split("="):
        try:
            if evaluate_expression(side) != target:
                return 0.0
            uses_all_numbers = uses_all_numbers or expression_literals(side) == numbers
        except ExpressionError:
            return 0.0
    return float(uses_all_numbers)


# Bounded pure-Python string and integer/Fraction work (no sympy, no regex backtracking on unbounded input): the
# reward pool may call it in the trainer's own process instead of a worker (megatron_rl/rewards/pool.py, in_process).
countdown_reward.in_process_safe = True
