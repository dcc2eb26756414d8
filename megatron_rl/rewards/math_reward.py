"""Math answer reward: extract the final answer, compare it with the ground truth using math-verify.

math-verify (github.com/huggingface/Math-Verify) parses LaTeX/plain answers to sympy and decides equivalence
(1/2 == 0.5 == \\frac{1}{2}, 1{,}000 == 1000, x=5 == 5, sets, intervals, matrices ...).

Timeouts: math-verify's own timeouts use ``signal.alarm``, which only works in the main thread of a process
(in any other thread it raises ValueError) and which shares the single ITIMER_REAL timer with the soft timeout
of our worker processes; a timeout inside math-verify is also swallowed (logged, returns False) where we want it
counted. So we call it with its timeouts disabled and bound every call with :class:`RewardPool`'s per-call
timeout instead (soft ``SIGALRM`` in the worker's main thread, then a hard kill). Called directly, outside the
pool, these functions have no timeout: a pathological answer such as ``\\boxed{9^{9^{9^{9}}}}`` can run for
minutes.
"""
from __future__ import annotations

import functools
import logging
from typing import Literal

from megatron_rl.tasks.extraction import clean_answer, extract_final_answer

# We disable math-verify's timeouts on purpose (see module docstring); silence its once-per-process warning
# about that, and its debug/warning noise for unparsable answers (an unparsable answer simply scores 0).
logging.getLogger("math_verify").setLevel(logging.ERROR)

# verl's math_dapo reward looks only at the end of a long response for an unformatted answer.
LENIENT_TAIL_CHARS = 300
Extraction = Literal["strict", "lenient"]


def _parse(text: str) -> list:
    from math_verify import parse

    return parse(text, parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def parse_ground_truth(ground_truth: str) -> tuple:
    """math-verify parse of a ground truth ("33", "\\frac{1}{2}", "$0.5$", "\\boxed{7}"); cached per process
    because evaluation and GRPO groups score many responses against the same ground truth."""
    if "\\boxed" in ground_truth or "\\fbox" in ground_truth:
        return tuple(_parse(ground_truth))
    return parse_answer(ground_truth)


def parse_answer(answer: str) -> tuple:
    """math-verify parse of an already-extracted answer. Wrapping it in ``\\boxed{}`` makes math-verify read all
    of it as one LaTeX expression (bare "3\\sqrt{2}" would otherwise parse as 3, and "(1,2)" as nothing)."""
    return tuple(_parse("\\boxed{" + clean_answer(answer) + "}"))


def is_equivalent(answer: str, ground_truth: str) -> bool:
    """True when the extracted ``answer`` is mathematically equivalent to ``ground_truth`` (no timeout here)."""
    from math_verify import verify

    predicted = parse_answer(answer)
    gold = parse_ground_truth(ground_truth)
    if not predicted or not gold:
        return False
    return bool(verify(list(gold), list(predicted), timeout_seconds=None))


def has_answer_format(response: str) -> bool:
    """True when the response ends with an answer in the boxed or "Answer:" format (see extraction.py)."""
    return extract_final_answer(response) is not None


def math_reward(
    response: str,
    ground_truth: str,
    *,
    extraction: Extraction = "strict",
    format_weight: float = 0.0,
) -> float:
    """1.0 when the response's final answer equals the ground truth (math-verify), else 0.0.

    extraction: "strict" (default) reads only a ``\\boxed{}`` or ``Answer:`` final answer (the DAPO recipe: an
      unformatted answer scores 0); "lenient" falls back to math-verify's own extraction over the last
      300 characters (its "final answer is" anchors, then the last expression) when neither format is present.
    format_weight: w in [0, 1); score = (1 - w) * correct + w * has_format. 0 (default) is the pure accuracy
      reward. With w > 0 a formatted wrong answer earns w and a correct one 1 (strict) -- the optional format
      reward. Evaluation counts a sample as correct when its score exceeds 0.5, so keep w < 0.5.
    """
    if extraction not in ("strict", "lenient"):
        raise ValueError(f"math_reward: extraction must be 'strict' or 'lenient', got {extraction!r}")
    if not 0.0 <= format_weight < 1.0:
        raise ValueError(f"math_reward: format_weight must be in [0, 1), got {format_weight!r}")
    answer = extract_final_answer(response)
    if answer is not None:
        correct = is_equivalent(answer, ground_truth)
    elif extraction == "lenient":
        correct = _lenient_match(response[-LENIENT_TAIL_CHARS:], ground_truth)
    else:
        correct = False
    if format_weight == 0.0:
        return float(correct)
    return (1.0 - format_weight) * float(correct) + format_weight * float(answer is not None)


def _lenient_match(tail: str, ground_truth: str) -> bool:
    from math_verify import verify

    predicted = _parse(tail)
    gold = parse_ground_truth(ground_truth)
    return bool(predicted and gold and verify(list(gold), predicted, timeout_seconds=None))


def warm_up() -> None:
    """Import math-verify/sympy and fill their lazy caches (~0.3 s) so that the first timed call does not pay it.
    Reward workers call a reward function's ``warmup`` attribute once before taking work."""
    for answer, ground_truth in (("\\frac{1}{2}", "0.5"), ("x = 5", "5"), ("3\\sqrt{2}", "\\sqrt{18}"), ("(1,2)", "[1,2]")):
        is_equivalent(answer, ground_truth)


math_reward.warmup = warm_up


def format_reward(response: str, ground_truth: str) -> float:
    """1.0 when the response states a final answer in the boxed or "Answer:" format, else 0.0 (ignores
    correctness; ``ground_truth`` is accepted so that it has the reward-function signature)."""
    del ground_truth
    return float(has_answer_format(response))
