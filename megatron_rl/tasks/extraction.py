"""Find the final answer a response commits to.

Two answer formats are recognised; whichever of them *ends last* in the response wins, because the final
answer is the last one a response commits to:

1. ``\\boxed{...}`` with balanced braces (the MATH convention, Hendrycks et al. 2021, arXiv 2103.03874, used
   by Qwen-Math and the AIME-2024 prompts);
2. ``Answer: ...`` up to the end of its line (the DAPO-Math-17k prompt asks for "Answer: $Answer" on the last
   line, DAPO arXiv 2503.14476; verl's ``math_dapo`` reward takes the last such match, case-insensitive).

``extract_answer_segment`` adds tolerant fallbacks for the short-answer synthetic tasks ("the answer is 7",
or else the last line, e.g. "3+4=7"). Pure string code (no sympy): shared by the math-verify reward and the
synthetic-task verifiers.
"""
from __future__ import annotations

import re

_BOXED_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_COLON = re.compile(r"(?i)\banswer\s*:[ \t]*([^\n]*)")
# Wrappers a model puts around a final answer that carry no meaning: math delimiters and markdown bold.
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"), ("`", "`"))
_TRAILING_PUNCTUATION = ".,;:!。"
_ANSWER_IS = re.compile(r"(?i)\banswer\s+is\s*:?[ \t]*([^\n]*)")


def last_boxed_span(text: str) -> tuple[str, int] | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, and the index where it ends.

    An unclosed box (a truncated response) is not an answer: returns None when no box closes.
    """
    for match in reversed(list(_BOXED_OPEN.finditer(text))):
        depth = 1
        for position in range(match.end(), len(text)):
            char = text[position]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[match.end():position], position + 1
    return None


def last_answer_colon_span(text: str) -> tuple[str, int] | None:
    """Rest of the line after the last non-empty ``Answer:`` (case-insensitive), and the index where it ends."""
    for match in reversed(list(_ANSWER_COLON.finditer(text))):
        if match.group(1).strip():
            return match.group(1), match.end(1)
    return None


def clean_answer(answer: str) -> str:
    """Strip what surrounds an answer without changing it: whitespace, trailing punctuation, ``$..$``, ``**..**``.

    "$\\frac{1}{2}$." -> "\\frac{1}{2}"; "**7**" -> "7"; "7." -> "7".
    """
    previous = None
    answer = answer.strip()
    while answer != previous:
        previous = answer
        answer = answer.strip().rstrip(_TRAILING_PUNCTUATION).strip()
        for opening, closing in _WRAPPERS:
            if len(answer) > len(opening) + len(closing) and answer.startswith(opening) and answer.endswith(closing):
                answer = answer[len(opening):len(answer) - len(closing)]
                break
    return answer


def extract_final_answer(response: str) -> str | None:
    """The final answer of ``response`` in the boxed or "Answer:" format (cleaned), or None when it has none.

    Examples: "... so \\boxed{\\frac{1}{2}}" -> "\\frac{1}{2}"; "work...\\nAnswer: $7$" -> "7"; "7" -> None.
    """
    spans = [span for span in (last_boxed_span(response), last_answer_colon_span(response)) if span is not None]
    if not spans:
        return None
    answer = clean_answer(max(spans, key=lambda span: span[1])[0])
    return answer or None


def extract_answer_segment(response: str) -> str | None:
    """Tolerant final-answer text for short-answer tasks: the boxed/"Answer:" answer, else the rest of the line
    after the last "answer is", else the last non-empty line; cleaned. None for an empty response.

    "Answer: 7" -> "7"; "The answer is 7." -> "7"; "3+4=7" -> "3+4=7" (the caller splits on "=").
    """
    strict = extract_final_answer(response)
    if strict is not None:
        return strict
    answer_is = [m.group(1) for m in _ANSWER_IS.finditer(response) if m.group(1).strip()]
    if answer_is:
        return clean_answer(answer_is[-1]) or None
    lines = [line for line in response.splitlines() if line.strip()]
    return clean_answer(lines[-1]) or None if lines else None
