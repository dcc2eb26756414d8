import math

import numpy as np
import pytest

from megatron_rl.rewards.math_reward import math_reward
from megatron_rl.rewards.registry import BUILTIN_REWARDS, RewardFunctionError, check_score, resolve_reward_fn
from tests.unit.rewards import scripted_rewards

SCRIPTED = "tests.unit.rewards.scripted_rewards"


@pytest.mark.parametrize("name", sorted(BUILTIN_REWARDS))
def test_every_builtin_name_resolves(name):
    reward = resolve_reward_fn(name)
    assert reward.spec == BUILTIN_REWARDS[name]
    assert callable(reward.fn)


def test_import_path_and_function_object_resolve_to_the_same_spec():
    by_path = resolve_reward_fn("megatron_rl.rewards.math_reward:math_reward", {"extraction": "lenient"})
    by_object = resolve_reward_fn(math_reward, {"extraction": "lenient"})
    assert by_path.fn is by_object.fn is math_reward
    assert by_path.spec == by_object.spec == "megatron_rl.rewards.math_reward:math_reward"
    assert by_path("I think 0.5", "1/2") == 1.0  # the option is bound


def test_dataset_fields_are_passed_only_to_functions_that_declare_them():
    fields = resolve_reward_fn(f"{SCRIPTED}:fields_reward")
    assert fields.passed_fields == ("data_source", "extra_info")
    assert fields("r", "g", data_source="src", extra_info={"flag": True}) == 1.0
    plain = resolve_reward_fn("math")
    assert plain.passed_fields == ()
    assert plain("Answer: 2", "2", data_source="anything", extra_info={"x": 1}) == 1.0
    assert resolve_reward_fn("default").passed_fields == ("data_source",)


@pytest.mark.parametrize("spec, fn_kwargs, message", [
    ("no_such_builtin", None, "neither a built-in name"),
    ("a:b:c", None, "neither a built-in name"),
    (":math_reward", None, "both the module and the function name"),
    ("megatron_rl.no_such_module:fn", None, "cannot import module 'megatron_rl.no_such_module'"),
    (f"{SCRIPTED}:no_such_fn", None, "has no attribute 'no_such_fn'; its public callables are: .*scripted_reward"),
    (f"{SCRIPTED}:not_a_function", None, "names a int, not a callable"),
    (f"{SCRIPTED}:one_argument_reward", None, r"cannot be called as fn\(response, ground_truth\)"),
    (f"{SCRIPTED}:scaled_reward", None, "missing a required argument: 'scale'"),
    (f"{SCRIPTED}:scaled_reward", {"scale": 2, "offset": 1}, "unexpected keyword argument 'offset'"),
    ("math", {"data_source": "x"}, "come from each dataset row"),
    ("__main__:reward", None, "cannot import from __main__"),
])
def test_bad_specs_fail_up_front_with_the_fix(spec, fn_kwargs, message):
    with pytest.raises(RewardFunctionError, match=message):
        resolve_reward_fn(spec, fn_kwargs)


def test_lambdas_and_nested_functions_are_refused():
    def nested(response, ground_truth):
        return 0.0

    for fn in (lambda response, ground_truth: 0.0, nested):
        with pytest.raises(RewardFunctionError, match="define it at module level"):
            resolve_reward_fn(fn)


def test_options_are_bound():
    reward = resolve_reward_fn(f"{SCRIPTED}:scaled_reward", {"scale": 3.0})
    assert reward("x", "x") == 3.0 and reward("x", "y") == 0.0
    assert reward.fn is scripted_rewards.scaled_reward


@pytest.mark.parametrize("value, expected", [(1, 1.0), (True, 1.0), (0.25, 0.25), (np.float32(0.5), 0.5),
                                             (np.int64(2), 2.0), (np.bool_(True), 1.0)])
def test_check_score_accepts_real_numbers(value, expected):
    assert check_score(value) == expected


@pytest.mark.parametrize("value", [float("nan"), math.inf, "1.0", None, [1.0], 1j])
def test_check_score_refuses_everything_else(value):
    with pytest.raises(ValueError, match="must return a finite float"):
        check_score(value)
