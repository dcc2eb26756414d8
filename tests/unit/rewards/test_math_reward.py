"""The math-verify reward, called in-process (the pool tests run the same function in workers)."""
import threading

import pytest

from megatron_rl.rewards.math_reward import format_reward, is_equivalent, math_reward

# (response, ground truth, expected reward) -- equivalent forms, formats, wrong answers, no answer, garbage.
ANSWER_TABLE = [
    # equivalent forms of one half, in both answer formats
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("Answer: 1/2", "0.5", 1.0),
    ("Answer: 0.5", "1/2", 1.0),
    ("Answer: $\\dfrac{1}{2}$.", "$\\frac12$", 1.0),
    ("\\boxed{2/4}", "1/2", 1.0),
    ("so we get\nAnswer: 0.50", "\\boxed{\\frac{1}{2}}", 1.0),
    # other equivalences math-verify knows
    ("Answer: 33", "33", 1.0),                      # an AIME ground truth
    ("\\boxed{033}", "33", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{3\\sqrt{2}}", "\\sqrt{18}", 1.0),
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", 1.0),
    # wrong answers
    ("\\boxed{0.6}", "1/2", 0.0),
    ("Answer: 34", "33", 0.0),
    ("Answer: 7 or 8", "7", 0.0),                   # a hedge is a set {7, 8}, not 7
    ("\\boxed{1/2} ... wait, no. Answer: 2", "1/2", 0.0),  # the last answer counts
    # no answer in the required format
    ("I think it is 0.5", "1/2", 0.0),
    ("", "1/2", 0.0),
    ("\\boxed{1/", "1/2", 0.0),                      # truncated response
    # garbage
    ("@@@ }}{{ \\frac{", "1/2", 0.0),
    ("Answer: \\frac{", "1/2", 0.0),
    ("\\boxed{}", "1/2", 0.0),
    ("Answer: \x00\xff\ufffd", "1/2", 0.0),
    ("\\boxed{" + "(" * 50 + "}", "1/2", 0.0),
]


@pytest.mark.parametrize("response, ground_truth, expected", ANSWER_TABLE)
def test_answer_table(response, ground_truth, expected):
    assert math_reward(response, ground_truth) == expected


def test_lenient_extraction_reads_unformatted_answers_strict_does_not():
    assert math_reward("I think it is 0.5", "1/2", extraction="strict") == 0.0
    assert math_reward("I think it is 0.5", "1/2", extraction="lenient") == 1.0
    assert math_reward("I think it is 0.7", "1/2", extraction="lenient") == 0.0
    # a formatted answer is used as is, in both modes
    assert math_reward("0.5 ... Answer: 3", "1/2", extraction="lenient") == 0.0


def test_format_weight_and_format_reward():
    assert math_reward("Answer: 3", "1/2", format_weight=0.1) == pytest.approx(0.1)
    assert math_reward("Answer: 0.5", "1/2", format_weight=0.1) == pytest.approx(1.0)
    assert math_reward("no answer", "1/2", format_weight=0.1) == 0.0
    assert format_reward("Answer: 3", "1/2") == 1.0
    assert format_reward("\\boxed{3}", "") == 1.0
    assert format_reward("3", "3") == 0.0


@pytest.mark.parametrize("kwargs, field", [({"extraction": "loose"}, "extraction"), ({"format_weight": 1.0}, "format_weight"),
                                           ({"format_weight": -0.1}, "format_weight")])
def test_bad_options_name_the_option(kwargs, field):
    with pytest.raises(ValueError, match=field):
        math_reward("Answer: 1", "1", **kwargs)


def test_is_equivalent_is_not_fooled_by_unparsable_text():
    assert is_equivalent("\\frac{1}{2}", "0.5")
    assert not is_equivalent("", "0.5")
    assert not is_equivalent("0.5", "")


def test_math_verify_signal_timeouts_fail_outside_a_main_thread():
    """Why the pool uses processes and disables math-verify's own timeouts: they rely on signal.alarm, which
    raises in any thread but the main one (so they cannot be used from a thread pool either)."""
    from math_verify import parse, verify

    errors = []

    def in_thread():
        try:
            verify(parse("\\boxed{1}"), parse("\\boxed{1}"), timeout_seconds=1)
        except ValueError as error:
            errors.append(str(error))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert errors and "thread" in errors[0]
