"""Advantage estimators against straightforward per-group formulas (float64, loops)."""
import math
import statistics

import pytest
import torch

from megatron_rl.algorithms import ADVANTAGE_ESTIMATORS, compute_advantages

REWARDS = [1.0, 0.0, 0.0, 1.0,   0.3, 0.3, 0.3, 0.3,   0.0, 0.0, 0.0, 1.0,   2.0, -1.0, 0.5, 0.25]
G = 4


def groups():
    return [REWARDS[k:k + G] for k in range(0, len(REWARDS), G)]


def expected(name):
    out = []
    for r in groups():
        mean = sum(r) / len(r)
        for i, ri in enumerate(r):
            if name == "grpo":  # DeepSeekMath: (r - mean) / (std + eps), sample std
                out.append((ri - mean) / (statistics.stdev(r) + 1e-6))
            elif name == "dr_grpo":  # Dr.GRPO: no std
                out.append(ri - mean)
            else:  # rloo: baseline is the mean of the other G - 1 rewards
                out.append(ri - sum(r[j] for j in range(len(r)) if j != i) / (len(r) - 1))
    return out


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_matches_formula(name):
    got = compute_advantages(name, torch.tensor(REWARDS, dtype=torch.float64), G)
    # float64, a handful of operations: 1e-12 relative
    assert got.tolist() == pytest.approx(expected(name), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_all_equal_rewards_give_zero_not_nan(name):
    got = compute_advantages(name, torch.full((8,), 0.7), G)
    assert torch.equal(got, torch.zeros(8))


def test_rloo_is_a_rescaled_dr_grpo():
    r = torch.tensor(REWARDS, dtype=torch.float64)
    torch.testing.assert_close(compute_advantages("rloo", r, G), compute_advantages("dr_grpo", r, G) * G / (G - 1))


def test_integer_rewards_are_accepted_as_float():
    got = compute_advantages("dr_grpo", torch.tensor([1, 0, 0, 1]), 2)
    assert got.dtype == torch.float32 and got.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_registry():
    assert set(ADVANTAGE_ESTIMATORS) >= {"grpo", "dr_grpo", "rloo"}


def test_bad_input():
    r = torch.tensor(REWARDS)
    with pytest.raises(ValueError, match="unknown advantage estimator 'gae'"):
        compute_advantages("gae", r, G)
    with pytest.raises(ValueError, match="not a positive multiple of group_size=3"):
        compute_advantages("grpo", r, 3)
    with pytest.raises(ValueError, match="group_size must be an int >= 2"):
        compute_advantages("grpo", r, 1)
    with pytest.raises(ValueError, match=r"rewards must be a 1-D tensor"):
        compute_advantages("grpo", r.view(4, 4), G)
    bad = r.clone()
    bad[5] = math.nan
    with pytest.raises(ValueError, match=r"rewards holds 1 non-finite value.*\(5,\)"):
        compute_advantages("grpo", bad, G)
