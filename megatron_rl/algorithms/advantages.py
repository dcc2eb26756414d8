"""Group-relative advantage estimators (registry by name): one advantage per response.

Rewards come as a flat [N] tensor of N = num_prompts * group_size responses, each prompt's group_size
responses contiguous (the order the rollout returns them). Each estimator maps a group's rewards r_1..r_G
to advantages A_1..A_G:
    grpo     A_i = (r_i - mean(r)) / (std(r) + 1e-6)          (DeepSeekMath, arXiv 2402.03300, sec. 4.1.2)
             std is the sample standard deviation (Bessel-corrected, torch.std's default, as verl and TRL)
    dr_grpo  A_i = r_i - mean(r)                              (Dr.GRPO, arXiv 2503.20783, eq. 3: no std)
    rloo     A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean(r))
             (leave-one-out baseline; Kool et al. 2019, Ahmadian et al. arXiv 2402.14740)
A group whose rewards are all equal gets all-zero advantages under every estimator (never NaN).
"""
from __future__ import annotations

from typing import Callable

import torch

from megatron_rl.algorithms.validation import check_finite

__all__ = ["ADVANTAGE_ESTIMATORS", "GRPO_STD_EPS", "register_advantage_estimator", "compute_advantages"]

GRPO_STD_EPS = 1e-6

ADVANTAGE_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}


def register_advantage_estimator(name: str):
    """Decorator: register `fn(grouped_rewards [P, G]) -> advantages [P, G]` under `name`."""

    def decorate(fn):
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"an advantage estimator named {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorate


@register_advantage_estimator("grpo")
def grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + GRPO_STD_EPS)


@register_advantage_estimator("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    return rewards - rewards.mean(dim=1, keepdim=True)


@register_advantage_estimator("rloo")
def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    group_size = rewards.shape[1]
    leave_one_out_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (group_size - 1)
    return rewards - leave_one_out_mean


def compute_advantages(name: str, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Advantages [N] for rewards [N] made of contiguous groups of `group_size` responses per prompt."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; registered: {sorted(ADVANTAGE_ESTIMATORS)}")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a 1-D tensor [num_prompts * group_size], got {shape}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(
            f"group_size must be an int >= 2 (a group of one response always has advantage 0), got {group_size!r}"
        )
    if rewards.numel() == 0 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a positive multiple of group_size={group_size}: "
            "pass whole groups (every prompt's group_size responses, contiguous)"
        )
    check_finite("rewards", rewards)
    grouped = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group_size)
    return ADVANTAGE_ESTIMATORS[name](grouped).reshape(-1)
