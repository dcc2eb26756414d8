"""The error a settings dataclass raises for a bad value of one of its fields (no dependencies: every layer uses it).

    @dataclass(frozen=True)
    class LSPOConfig:
        low_quantile: float = 0.3
        def __post_init__(self):
            require(0 < self.low_quantile <= 1, "low_quantile", f"must be in (0, 1], got {self.low_quantile}", "lspo")

Outside a config tree the message reads "lspo.low_quantile: must be in (0, 1], got 2"; inside one
(megatron_rl.config_loader.from_dict) the same error is reported under the full dotted key,
"algorithm.lspo.low_quantile: must be in (0, 1], got 2" (docs/design.md, config contract).
"""
from __future__ import annotations

import math

__all__ = ["FieldError", "is_finite_number", "require"]


class FieldError(ValueError):
    """A bad value of one field of a settings dataclass, raised by its __post_init__.

    field: the field's name relative to the dataclass ("clip_low"; "engine.model" for a check on a nested section);
    problem: what is wrong and the accepted range ("must be in [0, 1), got 1.2"); section: the dataclass's short
    name for messages outside a config tree ("loss" -> "loss.clip_low: must be ..."). Inside a config tree
    `from_dict` replaces the section by the full dotted path ("actor.loss.clip_low: must be ...")."""

    def __init__(self, field: str, problem: str, section: str = ""):
        self.field, self.problem, self.section = field, problem, section
        super().__init__(f"{section + '.' if section else ''}{field}: {problem}")


def require(condition: bool, field: str, problem: str, section: str = "") -> None:
    """Raise FieldError(field, problem, section) unless condition holds."""
    if not condition:
        raise FieldError(field, problem, section)


def is_finite_number(value) -> bool:
    """A real number (not bool), neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
