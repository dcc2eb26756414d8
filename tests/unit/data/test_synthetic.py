"""Synthetic tasks: deterministic per seed, verifiers accept their own references and tolerate formatting,
and the files they write load through the same loader as DAPO-Math-17k."""
import json

import pytest

from megatron_rl.data import PromptDataConfig, build_prompt_dataset, render_sft_example
from megatron_rl.data.synthetic import sft_pairs, write_synthetic_dataset
from megatron_rl.tasks import (
    ARITHMETIC_LEVELS,
    COUNTDOWN_LEVELS,
    SYNTHETIC_TASKS,
    arithmetic_reward,
    countdown_reward,
    generate_examples,
)
from megatron_rl.data.synthetic.__main__ import main as synthetic_cli
from megatron_rl.tasks.expression import ExpressionError, evaluate_expression
from megatron_rl.rewards.default import default_reward

ALL_LEVELS = [(task, level) for task, levels in (("arithmetic", ARITHMETIC_LEVELS), ("countdown", COUNTDOWN_LEVELS))
              for level in levels]


@pytest.mark.parametrize("task, difficulty", ALL_LEVELS)
def test_generators_are_deterministic_per_seed(task, difficulty):
    first = generate_examples(task, 50, seed=3, difficulty=difficulty)
    assert first == generate_examples(task, 50, seed=3, difficulty=difficulty)
    assert first != generate_examples(task, 50, seed=4, difficulty=difficulty)
    assert generate_examples(task, 20, seed=3, difficulty=difficulty) == first[:20]  # a prefix, not a reshuffle


@pytest.mark.parametrize("task, difficulty", ALL_LEVELS)
def test_verifiers_accept_their_own_reference_answers(task, difficulty):
    verify = SYNTHETIC_TASKS[task].verify
    for example in generate_examples(task, 200, seed=0, difficulty=difficulty):
        assert verify(example.reference_response, example.ground_truth) == 1.0, example
        assert verify("Answer: 123456789", example.ground_truth) == 0.0, example


def test_the_easiest_levels_are_very_easy():
    """The CPU quickstart's tiny model must learn level 1: single-digit operands and 1-2 digit answers."""
    arithmetic = generate_examples("arithmetic", 500, seed=0, difficulty=1)
    assert {e.prompt for e in arithmetic} == {f"What is {a}+{b}?" for a in range(10) for b in range(10)}
    assert all(e.reference_response == f"Answer: {e.ground_truth}" and len(e.ground_truth) <= 2 for e in arithmetic)
    countdown = generate_examples("countdown", 200, seed=0, difficulty=1)
    assert all(len(json.loads(e.ground_truth)["numbers"]) == 2 and len(e.reference_response) == len("Answer: 3+5")
               for e in countdown)


@pytest.mark.parametrize("response, expected", [
    ("Answer: 7", 1.0), ("answer:7.", 1.0), ("Answer: $7$", 1.0), ("\\boxed{7}", 1.0), ("The answer is 7", 1.0),
    ("3+4=7", 1.0), ("7", 1.0), ("  7\n", 1.0), ("Answer: 7.0", 1.0), ("Answer: 3+4=7", 1.0),
    ("Answer: 8", 0.0), ("Answer: 7 or 8", 0.0), ("3+4", 0.0), ("", 0.0), ("Answer: seven", 0.0),
    ("Answer: 77", 0.0), ("Answer: -7", 0.0),
])
def test_arithmetic_verifier_is_tolerant_of_format_not_of_content(response, expected):
    assert arithmetic_reward(response, "7") == expected


COUNTDOWN_TRUTH = json.dumps({"target": 16, "numbers": [3, 5, 2]})


@pytest.mark.parametrize("response, expected", [
    ("Answer: (3+5)*2", 1.0), ("Answer: 2*(5+3)", 1.0), ("\\boxed{(3+5)*2}", 1.0), ("(3+5)*2 = 16", 1.0),
    ("16 = (3 + 5) × 2", 1.0), ("Answer: (3+5)*2 = 16.", 1.0),
    ("Answer: (3+5)*2 = 17", 0.0),                  # a false claim on the other side
    ("Answer: 16", 0.0),                            # the target is not an expression of the numbers
    ("Answer: 3*5+1", 0.0),                         # 1 is not given, 2 unused
    ("Answer: (3+5)*2*1", 0.0),
    ("Answer: 8*2", 0.0),                           # 8 is not given
    ("Answer: (3+3)*2+4", 0.0),                     # reuses 3
    ("Answer: 3+5+2", 0.0),                         # wrong value
    ("Answer: 2**4", 0.0), ("Answer: __import__('os').system('true')", 0.0), ("Answer: 16/(5-5+0)", 0.0),
    ("", 0.0),
])
def test_countdown_verifier(response, expected):
    assert countdown_reward(response, COUNTDOWN_TRUTH) == expected


def test_countdown_division_is_exact():
    truth = json.dumps({"target": 2, "numbers": [7, 2, 3]})
    assert countdown_reward("Answer: (7-3)/2", truth) == 1.0
    assert countdown_reward("Answer: 7/2-3+2", truth) == 0.0  # 7/2 = 3.5 exactly: 2.5
    assert evaluate_expression("7/2") * 2 == 7
    with pytest.raises(ExpressionError):
        evaluate_expression("1/(2-2)")


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"difficulty must be one of \[1, 2, 3, 4, 5, 6\]"):
        generate_examples("arithmetic", 1, difficulty=9)
    with pytest.raises(ValueError, match="unknown synthetic task 'sudoku'"):
        generate_examples("sudoku", 1)
    with pytest.raises(ValueError, match="countdown ground truth must be JSON"):
        countdown_reward("Answer: 1+1", "2")
    with pytest.raises(ValueError, match="arithmetic ground truth must be a number"):
        arithmetic_reward("Answer: 1", "one")


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_written_files_load_like_dapo_and_score_with_the_default_reward(tmp_path, tiny_tokenizer, suffix):
    path = write_synthetic_dataset(tmp_path / f"countdown{suffix}", "countdown", 30, seed=5, difficulty=3,
                                   split="val")
    dataset = build_prompt_dataset(PromptDataConfig(path=str(path), cache_dir=str(tmp_path / "cache")),
                                   tiny_tokenizer)
    examples = generate_examples("countdown", 30, seed=5, difficulty=3)
    assert len(dataset) == 30 and dataset.report.skipped == []
    for loaded, example in zip(dataset, examples):
        assert loaded.messages == [{"role": "user", "content": example.prompt}]
        assert loaded.ground_truth == example.ground_truth and loaded.data_source == "synthetic/countdown"
        assert loaded.extra_info["reference_response"] == example.reference_response
        assert loaded.extra_info["split"] == "val" and loaded.extra_info["difficulty"] == 3
        # the "default" reward routes by data_source to the countdown verifier
        assert default_reward(example.reference_response, loaded.ground_truth, loaded.data_source) == 1.0


def test_sft_pairs_render_to_prompt_and_response_tokens_that_end_the_turn(tiny_tokenizer):
    pairs = sft_pairs("arithmetic", 5, seed=99, difficulty=1)
    assert pairs[0].messages == [{"role": "user", "content": generate_examples("arithmetic", 1, 99, 1)[0].prompt}]
    for pair in pairs:
        prompt_ids, response_ids = render_sft_example(tiny_tokenizer, pair.messages, pair.response)
        assert tiny_tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")
        assert tiny_tokenizer.decode(response_ids) == pair.response + "<|im_end|>\n"
        assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in response_ids


def test_cli_writes_a_file(tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    synthetic_cli(["--task", "arithmetic", "--num-examples", "4", "--seed", "1", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["reward_model"]["ground_truth"] for row in rows] == [
        e.ground_truth for e in generate_examples("arithmetic", 4, seed=1)]
    assert "wrote 4 arithmetic examples" in capsys.readouterr().out


@pytest.mark.parametrize("task", sorted(SYNTHETIC_TASKS))
def test_default_reward_routes_every_synthetic_task_to_its_verifier(task):
    """Reference answers score 1 and a wrong answer 0 through "default", for every registered synthetic task."""
    for example in generate_examples(task, 20, seed=3, difficulty=2):
        assert default_reward(example.reference_response, example.ground_truth, example.data_source) == 1.0
        assert default_reward("Answer: -12345", example.ground_truth, example.data_source) == 0.0


def test_default_reward_sends_other_sources_to_math_verify():
    # \frac{1}{2} = 0.5 is math-verify's equivalence; the arithmetic verifier reads plain numbers only
    assert default_reward("Answer: \\frac{1}{2}", "0.5", "math_dapo") == 1.0
    assert default_reward("Answer: \\frac{1}{2}", "0.5", "synthetic/arithmetic") == 0.0
    assert default_reward("Answer: \\frac{1}{2}", "0.5") == 1.0  # no data_source: math
