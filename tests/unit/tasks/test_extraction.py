import pytest

from megatron_rl.tasks.extraction import (
    clean_answer,
    extract_answer_segment,
    extract_final_answer,
    last_boxed_span,
)


@pytest.mark.parametrize("response, expected", [
    ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                 # nested braces
    ("\\boxed{1} then \\boxed{2}", "2"),                          # the last box wins
    ("\\fbox{5}", "5"),
    ("first \\boxed{3} then \\boxed{4", "3"),                     # an unclosed (truncated) box is not an answer
    ("Some work.\nAnswer: 42", "42"),                              # DAPO format
    ("answer:   $7$.", "7"),                                       # case, $..$, trailing period
    ("Answer: **12**", "12"),                                      # markdown bold
    ("Answer: \\(x+1\\)", "x+1"),
    ("\\boxed{1/2} so the Answer: 0.5", "0.5"),                     # whichever ends last
    ("Answer: 3, and so \\boxed{4}", "4"),
    ("Answer:\nAnswer: 5", "5"),                                   # an empty Answer: line does not count
    ("The answer is 7", None),                                     # not a strict format
    ("", None),
    ("\\boxed{}", None),
])
def test_extract_final_answer(response, expected):
    assert extract_final_answer(response) == expected


def test_last_boxed_span_reports_where_the_box_ends():
    assert last_boxed_span("ab \\boxed{x{y}} cd") == ("x{y}", len("ab \\boxed{x{y}}"))
    assert last_boxed_span("no box") is None


@pytest.mark.parametrize("raw, cleaned", [
    (" $\\frac{1}{2}$. ", "\\frac{1}{2}"), ("**7**", "7"), ("7.", "7"), ("$$3$$", "3"), ("`5`", "5"),
    ("$", "$"), ("1,000", "1,000"),
])
def test_clean_answer(raw, cleaned):
    assert clean_answer(raw) == cleaned


@pytest.mark.parametrize("response, expected", [
    ("Answer: 7", "7"), ("The answer is 7.", "7"), ("3+4=7", "3+4=7"), ("blah\n  **7**  \n", "7"),
    ("\n \n", None), ("", None),
])
def test_extract_answer_segment_is_tolerant(response, expected):
    assert extract_answer_segment(response) == expected
