"""DAPO soft overlong penalty (arXiv 2503.14476, Eq. 13) at its boundaries, and masking of truncated responses."""
import typing

import pytest
import torch

from megatron_rl.algorithms.overlong import (
    FINISH_REASONS,
    OverlongConfig,
    apply_overlong_penalty,
    apply_truncation_mask,
    soft_overlong_penalty,
    truncated_from_finish_reasons,
)
from megatron_rl.rollout.types import FinishReason


def test_penalty_values_at_the_boundaries():
    # L_max = 20, L_cache = 4: free up to 16, linear (16 - |y|)/4 in (16, 20], -1 beyond.
    lengths = [0, 15, 16, 17, 18, 19, 20, 21, 1000]
    expected = [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
    assert soft_overlong_penalty(lengths, 20, 4).tolist() == expected  # exact binary fractions


def test_penalty_with_cache_equal_to_max_length_and_a_factor():
    # L_cache = L_max = 8: every token costs 1/8; penalty_factor scales the whole term.
    assert soft_overlong_penalty([0, 1, 4, 8, 9], 8, 8).tolist() == [0.0, -0.125, -0.5, -1.0, -1.0]
    assert soft_overlong_penalty([0, 1, 4, 8, 9], 8, 8, 0.5).tolist() == [0.0, -0.0625, -0.25, -0.5, -0.5]


def test_dapo_paper_setting():
    # DAPO: L_max = 20480, L_cache = 4096 -> free up to 16384, -0.5 at 18432, -1 at 20480.
    assert soft_overlong_penalty([16384, 18432, 20480], 20480, 4096).tolist() == [0.0, -0.5, -1.0]


def test_apply_overlong_penalty_respects_the_switch_and_dtype():
    rewards = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float32)
    off = apply_overlong_penalty(rewards, [10, 19, 25], OverlongConfig())
    assert torch.equal(off, rewards) and off is not rewards
    on = apply_overlong_penalty(rewards, [10, 19, 25], OverlongConfig(True, 20, 4))
    assert on.dtype == torch.float32 and on.tolist() == [1.0, -0.75, 0.0]
    assert rewards.tolist() == [1.0, 0.0, 1.0]  # input untouched
    with pytest.raises(ValueError, match="one length per reward"):
        apply_overlong_penalty(rewards, [10, 19], OverlongConfig(True, 20, 4))


def test_truncated_responses_get_their_loss_mask_zeroed():
    mask = torch.ones(3, 4)
    reasons = ["stop", "length", "abort"]
    out = apply_truncation_mask(mask, reasons, OverlongConfig(mask_truncated=True))
    assert out.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert mask.sum() == 12  # input untouched
    assert torch.equal(apply_truncation_mask(mask, reasons, OverlongConfig()), mask)
    bool_mask = torch.ones(3, 2, dtype=torch.bool)
    assert apply_truncation_mask(bool_mask, reasons, OverlongConfig(mask_truncated=True))[1].tolist() == [False] * 2


def test_truncation_inputs_are_checked():
    assert truncated_from_finish_reasons(["length", "stop"]).tolist() == [True, False]
    with pytest.raises(ValueError, match=r"finish_reasons\[1\] is 'max_tokens'"):
        truncated_from_finish_reasons(["stop", "max_tokens"])
    with pytest.raises(ValueError, match="one finish reason per response row"):
        apply_truncation_mask(torch.ones(2, 3), ["stop"], OverlongConfig(mask_truncated=True))


def test_finish_reasons_mirror_the_rollout_types():
    assert set(FINISH_REASONS) == set(typing.get_args(FinishReason))


def test_bad_penalty_inputs():
    with pytest.raises(ValueError, match=">= 0"):
        soft_overlong_penalty([3, -1], 20, 4)
    with pytest.raises(ValueError, match="cache_length"):
        soft_overlong_penalty([3], 20, 21)
    with pytest.raises(ValueError, match="1-D"):
        soft_overlong_penalty([[3]], 20, 4)
    with pytest.raises(ValueError, match="finite token counts"):
        soft_overlong_penalty([3, float("nan")], 20, 4)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(soft_penalty="yes"), "overlong.soft_penalty: must be True or False"),
        (dict(mask_truncated=1), "overlong.mask_truncated: must be True or False"),
        (dict(soft_penalty=True), "overlong.max_response_length"),
        (dict(soft_penalty=True, max_response_length=20), "overlong.cache_length"),
        (dict(soft_penalty=True, max_response_length=20, cache_length=0), "overlong.cache_length"),
        (dict(soft_penalty=True, max_response_length=20, cache_length=21), "overlong.cache_length"),
        (dict(soft_penalty=True, max_response_length=20, cache_length=4, penalty_factor=-1), "overlong.penalty_factor"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OverlongConfig(**kwargs)
