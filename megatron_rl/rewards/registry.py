"""Reward functions by name or import path, validated before any worker starts.

A reward function is any module-level callable

    def my_reward(response: str, ground_truth: str, **options) -> float

named either by a built-in name (``BUILTIN_REWARDS``) or by ``"package.module:function"``. It may also declare
``data_source`` and/or ``extra_info`` parameters (or ``**kwargs``) to receive those dataset fields. Options
from the config (``fn_kwargs``) are bound as keyword arguments. It must return a finite number (bool counts);
anything else is a reward error (scored 0 and counted, see RewardPool).

A function may carry a ``warmup`` attribute: a no-argument callable each worker runs once at start-up, outside
the timeout (the math reward uses it to load sympy, so the first timed call does not pay ~0.3 s of imports).

A function may carry an ``in_process_safe`` attribute: True when every call is bounded pure-Python work that cannot
hang or take the process down (the synthetic-task verifiers), or a callable (response, ground_truth, data_source,
extra_info) -> bool deciding per item (the "default" reward: synthetic items yes, math-verify items no). The pool
then scores such items in the calling process, without the round trip to a worker (RewardPool, in_process).

Functions run in separate worker processes that import them again by path, so they must live in an importable
module: not in ``__main__``, not a lambda or a nested function.
"""
from __future__ import annotations

import importlib
import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

BUILTIN_REWARDS: dict[str, str] = {
    "default": "megatron_rl.rewards.default:default_reward",
    "math": "megatron_rl.rewards.math_reward:math_reward",
    "format": "megatron_rl.rewards.math_reward:format_reward",
    "arithmetic": "megatron_rl.tasks.arithmetic:arithmetic_reward",
    "countdown": "megatron_rl.tasks.countdown:countdown_reward",
    "chain": "megatron_rl.tasks.chain:chain_reward",
}
# Dataset fields passed to a reward function that declares a parameter of this name (or **kwargs).
OPTIONAL_FIELDS = ("data_source", "extra_info")
_EXPECTED = "def fn(response: str, ground_truth: str, **options) -> float"


class RewardFunctionError(ValueError):
    """A reward function spec that cannot be imported or called as a reward function."""


@dataclass(frozen=True)
class RewardFunction:
    """A validated reward function: ``spec`` is its import path, ``fn_kwargs`` the bound options."""

    spec: str
    fn: Callable[..., Any]
    fn_kwargs: dict[str, Any] = field(default_factory=dict)
    passed_fields: tuple[str, ...] = ()

    def __call__(self, response: str, ground_truth: str, data_source: str = "", extra_info: dict | None = None):
        fields = {"data_source": data_source, "extra_info": extra_info if extra_info is not None else {}}
        extra = {name: fields[name] for name in self.passed_fields}
        return self.fn(response, ground_truth, **extra, **self.fn_kwargs)

    def in_process_safe(self, response: str, ground_truth: str, data_source: str = "",
                        extra_info: dict | None = None) -> bool:
        """Whether this item may be scored in the calling process (the function's ``in_process_safe``)."""
        declared = getattr(self.fn, "in_process_safe", False)
        if callable(declared):
            return bool(declared(response, ground_truth, data_source, extra_info))
        return declared is True


def spec_of(fn: Callable[..., Any]) -> str:
    """Import path "module:qualname" of a module-level function, or a clear error when workers could not import it."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise RewardFunctionError(
            f"reward function {fn!r} is a lambda, a nested function or has no import path; reward workers import "
            f"it by 'package.module:function', so define it at module level in an importable module"
        )
    if module == "__main__":
        raise RewardFunctionError(
            f"reward function {qualname!r} is defined in __main__; reward workers import it by path, so move it to "
            f"an importable module and pass 'package.module:{qualname}'"
        )
    return f"{module}:{qualname}"


def import_reward_fn(spec: str) -> Callable[..., Any]:
    """The callable named by a built-in name or "package.module:function" (attribute paths like "mod:Class.fn" work)."""
    path = BUILTIN_REWARDS.get(spec, spec)
    if not isinstance(path, str) or path.count(":") != 1:
        raise RewardFunctionError(
            f"reward function {spec!r} is neither a built-in name ({', '.join(sorted(BUILTIN_REWARDS))}) nor an "
            f"import path of the form 'package.module:function'"
        )
    module_name, attr_path = path.split(":")
    if not module_name or not attr_path:
        raise RewardFunctionError(f"reward function {spec!r}: both the module and the function name are required, "
                                  f"as in 'package.module:function'")
    if module_name == "__main__":
        raise RewardFunctionError(f"reward function {spec!r}: reward workers cannot import from __main__; move the "
                                  f"function to an importable module")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or whatever the module raises at import
        raise RewardFunctionError(
            f"reward function {spec!r}: cannot import module {module_name!r} ({type(error).__name__}: {error}); "
            f"check the spelling and that the package is importable (on PYTHONPATH) on every node"
        ) from error
    for depth, part in enumerate(attr_path.split(".")):
        if not hasattr(target, part):
            owner = module_name if depth == 0 else ".".join([module_name] + attr_path.split(".")[:depth])
            public = sorted(name for name in dir(target) if not name.startswith("_") and callable(getattr(target, name)))
            raise RewardFunctionError(
                f"reward function {spec!r}: {owner!r} has no attribute {part!r}; its public callables are: "
                f"{', '.join(public[:30]) or '(none)'}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise RewardFunctionError(f"reward function {spec!r} names a {type(target).__name__}, not a callable")
    return target


def resolve_reward_fn(spec: str | Callable[..., Any], fn_kwargs: dict[str, Any] | None = None) -> RewardFunction:
    """Import and validate a reward function; every problem is a RewardFunctionError naming the spec and the fix.

    ``spec`` may also be a module-level function object (its import path is used, so workers can import it).
    """
    fn_kwargs = dict(fn_kwargs or {})
    if callable(spec) and not isinstance(spec, str):
        spec = spec_of(spec)
    if not isinstance(spec, str):
        raise RewardFunctionError(f"reward function must be a name, an import path or a function, got {spec!r}")
    path = BUILTIN_REWARDS.get(spec, spec)
    fn = import_reward_fn(path)
    clashes = sorted(set(fn_kwargs) & set(OPTIONAL_FIELDS))
    if clashes:
        raise RewardFunctionError(
            f"reward function {spec!r}: fn_kwargs may not set {clashes}; those come from each dataset row"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no inspectable signature: trust them
        return RewardFunction(spec=path, fn=fn, fn_kwargs=fn_kwargs)
    passed_fields = _accepted_fields(signature)
    try:
        signature.bind("response", "ground_truth", **dict.fromkeys(passed_fields), **fn_kwargs)
    except TypeError as error:
        raise RewardFunctionError(
            f"reward function {spec!r} has signature {fn.__name__}{signature}, which cannot be called as "
            f"fn(response, ground_truth{''.join(f', {k}=...' for k in fn_kwargs)}) ({error}); expected {_EXPECTED}"
        ) from error
    return RewardFunction(spec=path, fn=fn, fn_kwargs=fn_kwargs, passed_fields=passed_fields)


def _accepted_fields(signature: inspect.Signature) -> tuple[str, ...]:
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return OPTIONAL_FIELDS
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(name for name in OPTIONAL_FIELDS
                 if name in signature.parameters and signature.parameters[name].kind in keyword_kinds)


def check_score(value: Any) -> float:
    """The reward value as a float; a ValueError for anything that is not a finite real number."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, numbers.Real):
        score = float(value)
        if math.isfinite(score):
            return score
    # repr() of arbitrary objects (a sympy expression, say) can be slow: show plain values only.
    shown = repr(value)[:80] if isinstance(value, (str, bytes, int, float, complex, type(None))) else "object"
    raise ValueError(f"reward function returned {type(value).__name__} {shown}; it must return a finite float")
