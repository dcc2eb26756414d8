"""The "chain" synthetic task: worked vs direct reference responses (length can vary), verifier, registration."""
import re

import pytest

from megatron_rl.tasks.chain import CHAIN_LEVELS, chain_reward
from megatron_rl.tasks.expression import evaluate_expression
from megatron_rl.tasks.registry import SYNTHETIC_TASKS, generate_examples


@pytest.mark.parametrize("level", sorted(CHAIN_LEVELS))
def test_references_are_correct_and_the_partial_sums_add_up(level):
    examples = generate_examples("chain", 300, seed=3, difficulty=level)
    assert examples == generate_examples("chain", 300, seed=3, difficulty=level)  # a pure function of the seed
    spec = CHAIN_LEVELS[level]
    for e in examples:
        expression = re.fullmatch(r"What is (.+)\?", e.prompt).group(1)
        assert len(re.findall(r"\d+", expression)) == spec.num_operands
        assert evaluate_expression(expression) == int(e.ground_truth) >= 0
        assert chain_reward(e.reference_response, e.ground_truth) == 1.0
        steps = e.reference_response.split(". ")[:-1]  # the worked chain before "Answer: v"
        total = None
        for step in steps:
            left, right = step.split("=")
            assert total is None or left.startswith(str(total))  # each step continues the running total
            assert evaluate_expression(left) == int(right)
            total = int(right)
        if steps:
            assert len(steps) == spec.num_operands - 1 and total == int(e.ground_truth)
    worked = sum("=" in e.reference_response for e in examples) / len(examples)
    assert abs(worked - spec.worked_fraction) < 0.1  # 300 draws: binomial std <= 0.029


def test_worked_responses_are_several_times_longer_in_tokens():
    from megatron_rl.models.tiny import build_tokenizer

    tok = build_tokenizer()
    examples = generate_examples("chain", 200, seed=0, difficulty=2)
    lengths = {True: [], False: []}
    for e in examples:
        lengths["=" in e.reference_response].append(len(tok(e.reference_response)["input_ids"]))
    mean = {k: sum(v) / len(v) for k, v in lengths.items()}
    assert mean[False] <= 4 and mean[True] >= 4 * mean[False]


@pytest.mark.parametrize("response, reward", [
    ("3+4=7. 7+5=12. Answer: 12", 1.0),
    ("Answer: 12", 1.0),
    ("3+4=7. 7+5=12", 1.0),   # a chain cut before its "Answer:" line: the last "=" value is the answer
    ("3+4=7. 7+5=11. Answer: 11", 0.0),
    ("Answer: 12 or 13", 0.0),
    ("", 0.0),
])
def test_verifier_checks_the_final_number_only(response, reward):
    assert chain_reward(response, "12") == reward


def test_registered():
    task = SYNTHETIC_TASKS["chain"]
    assert task.data_source == "synthetic/chain" and task.verify is chain_reward
    with pytest.raises(ValueError, match="difficulty must be one of"):
        generate_examples("chain", 1, difficulty=99)
