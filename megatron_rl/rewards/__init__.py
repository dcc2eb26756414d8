"""Rewards: math verification (math-verify), synthetic-task verifiers, and a timeout-safe scoring pool.

    from megatron_rl.rewards import RewardItem, RewardPool
    with RewardPool("default", num_workers=4, timeout_s=10) as pool:
        scores, metrics = pool.score([RewardItem(response, ground_truth, data_source), ...])
"""
from megatron_rl.rewards.pool import RewardPool, RewardPoolError
from megatron_rl.rewards.registry import BUILTIN_REWARDS, RewardFunction, RewardFunctionError, resolve_reward_fn
from megatron_rl.rewards.types import RewardItem, RewardMetrics

__all__ = [
    "BUILTIN_REWARDS", "RewardFunction", "RewardFunctionError", "RewardItem", "RewardMetrics", "RewardPool",
    "RewardPoolError", "resolve_reward_fn",
]
