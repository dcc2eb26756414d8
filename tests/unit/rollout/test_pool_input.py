"""What the pool checks before any engine is asked (no Ray, no vLLM needed)."""
import pytest

from megatron_rl.rollout import EngineConfig, RolloutError, RolloutPool, RolloutPoolConfig
from megatron_rl.rollout.pool import validate_prompts


def test_valid_prompts_become_lists():
    assert validate_prompts([(1, 2), [3]], max_model_len=8, max_tokens=4) == [[1, 2], [3]]


@pytest.mark.parametrize(
    "prompts, error",
    [
        ([[1], []], r"prompts\[1\] is empty"),
        (["text"], r"prompts\[0\] is text"),
        ([[1, -2]], r"prompts\[0\] must hold non-negative int"),
        ([[1, 2.0]], r"prompts\[0\] must hold non-negative int"),
        ([[True]], r"prompts\[0\] must hold non-negative int"),
        ([[1] * 5], r"prompts\[0\] has 5 tokens; with sampling.max_tokens=4 that exceeds engine.max_model_len=8"),
    ],
)
def test_bad_prompts_name_the_prompt(prompts, error):
    with pytest.raises(ValueError, match=error):
        validate_prompts(prompts, max_model_len=8, max_tokens=4)


def test_pool_needs_a_ray_cluster():
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray cluster is running in this process")
    with pytest.raises(RuntimeError, match="no Ray cluster"):
        RolloutPool(RolloutPoolConfig(EngineConfig(model="/m")))
    assert issubclass(RolloutError, RuntimeError)
