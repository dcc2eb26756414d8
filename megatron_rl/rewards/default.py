"""The "default" reward: route each response to its task's verifier by the row's ``data_source``.

synthetic/arithmetic, synthetic/countdown and synthetic/chain go to their own verifiers; everything else (DAPO-Math-17k, AIME,
MATH ...) to the math-verify reward. The same idea as verl's ``default_compute_score``.
"""
from __future__ import annotations

from megatron_rl.data.synthetic.arithmetic import arithmetic_reward
from megatron_rl.data.synthetic.chain import chain_reward
from megatron_rl.data.synthetic.countdown import countdown_reward
from megatron_rl.rewards.math_reward import math_reward, warm_up

VERIFIERS_BY_DATA_SOURCE = {
    "synthetic/arithmetic": arithmetic_reward,
    "synthetic/countdown": countdown_reward,
    "synthetic/chain": chain_reward,
}


def default_reward(response: str, ground_truth: str, data_source: str = "") -> float:
    verifier = VERIFIERS_BY_DATA_SOURCE.get(data_source)
    if verifier is not None:
        return verifier(response, ground_truth)
    return math_reward(response, ground_truth)


default_reward.warmup = warm_up
