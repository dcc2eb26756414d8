"""Exact evaluation of small integer arithmetic expressions from model output -- without ``eval``.

Only non-negative integer literals, ``+ - * /``, unary ``+``/``-`` and parentheses are accepted (``×``, ``÷`` and
``−`` are read as ``*``, ``/`` and ``-``); the value is an exact ``Fraction``. Anything else (names, calls, ``**``,
``//``, floats, over-long input) is an :class:`ExpressionError`, so a response can never run code or make the
verifier compute something huge.
"""
from __future__ import annotations

import ast
import re
from fractions import Fraction

MAX_EXPRESSION_CHARS = 200
_ALLOWED_CHARACTERS = re.compile(r"[0-9+\-*/()\s]*")
_SPELLINGS = {"×": "*", "÷": "/", "−": "-", "·": "*"}
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


class ExpressionError(ValueError):
    """The text is not a small integer arithmetic expression, or divides by zero."""


def normalize_expression(text: str) -> str:
    for spelling, operator in _SPELLINGS.items():
        text = text.replace(spelling, operator)
    return text.strip()


def _parse(text: str) -> ast.expr:
    text = normalize_expression(text)
    if not text or len(text) > MAX_EXPRESSION_CHARS or not _ALLOWED_CHARACTERS.fullmatch(text):
        raise ExpressionError(f"not an integer arithmetic expression: {text[:40]!r}")
    try:
        return ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError) as error:
        raise ExpressionError(f"cannot parse {text[:40]!r}: {error}") from error


def _evaluate(node: ast.expr) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        divisor = _evaluate(node.right)
        if divisor == 0:
            raise ExpressionError("division by zero")
        return _evaluate(node.left) / divisor
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ExpressionError(f"unsupported element {type(node).__name__}")


def evaluate_expression(text: str) -> Fraction:
    """Exact value of ``text``: evaluate_expression("(3+5)*2") == 16; evaluate_expression("7/2") == Fraction(7, 2)."""
    return _evaluate(_parse(text))


def expression_literals(text: str) -> list[int]:
    """The integer literals of ``text``, sorted (a multiset): "(3+5)*2" -> [2, 3, 5]."""
    return sorted(node.value for node in ast.walk(_parse(text)) if isinstance(node, ast.Constant))


def parse_number(text: str) -> Fraction | None:
    """A plain number ("7", "-12", "98,901", "7.0", "3/4") as a Fraction; None for anything else."""
    text = normalize_expression(text).replace(",", "").replace(" ", "")
    if re.fullmatch(r"[+-]?\d+(\.\d+)?", text):
        return Fraction(text)
    if re.fullmatch(r"[+-]?\d+/\d+", text) and int(text.split("/")[1]) != 0:
        return Fraction(text)
    return None
