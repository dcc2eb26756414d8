"""DAPO accuracy filter, LSPO-after-accuracy selection and the over-sampling loop (cap, top-up, excess, metrics)."""
import math
import warnings

import pytest
import torch

from megatron_rl.algorithms.dynamic_sampling import (
    KEPT,
    TOP_UP_LSPO,
    TOP_UP_ZERO_ADVANTAGE,
    DynamicSamplingCapWarning,
    DynamicSamplingConfig,
    GroupOutcome,
    fill_batch,
    reward_variance_mask,
    select_round,
)
from megatron_rl.algorithms.lspo import LengthQuantiles, LSPOConfig


def group(rewards, length, payload=None):
    """A group whose responses all have the same length, so L(q) == length."""
    return GroupOutcome(rewards=rewards, response_lengths=[length] * len(rewards), payload=payload)


class Generator:
    """Fake rollout: returns the given rounds in order (cycling) and counts its calls."""

    def __init__(self, *rounds):
        self.rounds = rounds
        self.calls = []

    def __call__(self, round_index):
        self.calls.append(round_index)
        return self.rounds[round_index % len(self.rounds)]


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------- accuracy filter and one round's selection


def test_accuracy_filter_drops_all_equal_groups():
    groups = [group([0, 1, 1], 5), group([1, 1, 1], 5), group([0, 0, 0], 5), group([0.5], 5), group([0.2, 0.3], 5)]
    assert reward_variance_mask(groups).tolist() == [True, False, False, False, True]
    # a tolerance treats float noise as equal
    noisy = [group([1.0, 1.0 + 1e-9], 5)]
    assert reward_variance_mask(noisy).tolist() == [True]
    assert reward_variance_mask(noisy, atol=1e-6).tolist() == [False]


# Passing groups have L = 10, 20, 30, 40, 50 -> Q = x_(2), x_(4), x_(5) = 20, 40, 50: only L = 30 is dropped.
# The zero-variance groups (L = 1, 100, 2) must not enter the quantiles: over all eight lengths Q would be
# 10, 40, 100 and L = 20 would be dropped too.
ROUND = [
    group([0, 1], 10, "g0"),
    group([1, 1], 1, "g1"),
    group([0, 1], 20, "g2"),
    group([0, 1], 30, "g3"),
    group([0, 0], 100, "g4"),
    group([1, 0], 40, "g5"),
    group([0, 1], 50, "g6"),
    group([1, 1], 2, "g7"),
]


def test_lspo_runs_on_the_groups_that_passed_the_accuracy_filter():
    sel = select_round(ROUND, DynamicSamplingConfig(), LSPOConfig())
    assert sel.passed_accuracy.tolist() == [True, False, True, True, False, True, True, False]
    assert sel.kept.tolist() == [True, False, True, False, False, True, True, False]
    assert sel.quantiles == LengthQuantiles(low=20.0, high=40.0, max=50.0)
    assert sel.mean_lengths.tolist() == [10, 1, 20, 30, 100, 40, 50, 2]


def test_length_only_ablation_uses_every_group():
    # accuracy filter off: all eight lengths [10,1,20,30,100,40,50,2] -> Q = x_(3), x_(6), x_(8) = 10, 40, 100
    sel = select_round(ROUND, DynamicSamplingConfig(accuracy_filter=False), LSPOConfig())
    assert sel.quantiles == LengthQuantiles(low=10.0, high=40.0, max=100.0)
    assert sel.kept.tolist() == [True, True, False, False, True, True, True, True]


def test_without_lspo_the_accuracy_filter_decides_alone():
    sel = select_round(ROUND, DynamicSamplingConfig(), None)
    assert torch.equal(sel.kept, sel.passed_accuracy) and sel.quantiles is None
    sel = select_round(ROUND, DynamicSamplingConfig(), LSPOConfig(enabled=False))
    assert torch.equal(sel.kept, sel.passed_accuracy) and sel.quantiles is None


def test_round_where_the_accuracy_filter_removes_everything():
    sel = select_round([group([1, 1], 3), group([0, 0], 9)], DynamicSamplingConfig(), LSPOConfig())
    assert sel.kept.tolist() == [False, False] and sel.quantiles is None
    sel = select_round([], DynamicSamplingConfig(), LSPOConfig())
    assert sel.kept.shape == (0,) and sel.quantiles is None


# ---------------------------------------------------------------- the over-sampling loop


def test_generator_that_never_produces_a_usable_group_stops_at_the_cap():
    gen = Generator([group([1, 1], 4), group([0, 0], 6), group([1, 1, 1], 8), group([0, 0], 2)])
    with pytest.warns(DynamicSamplingCapWarning, match=r"cap of 3 generation rounds.*0 of the 2 groups.*EMPTY"):
        out = fill_batch(gen, target_groups=2, sampling=DynamicSamplingConfig(max_rounds=3), lspo=LSPOConfig())
    assert gen.calls == [0, 1, 2]  # stopped at the cap, no fourth round
    assert out.groups == [] and out.sources == []
    m = out.metrics
    assert (m.rounds_used, m.max_rounds, m.cap_hit) == (3, 3, True)
    assert (m.prompts_generated, m.responses_generated) == (12, 27)
    assert (m.kept_accuracy, m.dropped_accuracy, m.kept_lspo, m.dropped_lspo) == (0, 12, 0, 0)
    assert (m.final_groups, m.shortfall, m.excess_dropped) == (0, 2, 0)
    assert math.isnan(m.q_low) and math.isnan(m.q_high) and math.isnan(m.q_max)
    assert m.mean_length_generated == pytest.approx(5.0) and math.isnan(m.mean_length_final)
    assert [r.kept for r in out.rounds] == [0, 0, 0] and all(r.quantiles is None for r in out.rounds)
    d = m.as_dict()
    assert d["cap_hit"] == 1.0 and d["shortfall"] == 2.0 and all(isinstance(v, float) for v in d.values())


def test_top_up_never_uses_zero_advantage_groups_unless_allowed():
    rounds = [[group([1, 1], 4, "a"), group([0, 0], 6, "b")]]
    cfg = DynamicSamplingConfig(max_rounds=2, on_cap="top_up")
    with pytest.warns(DynamicSamplingCapWarning, match="EMPTY"):
        assert fill_batch(Generator(*rounds), 3, cfg).groups == []
    cfg = DynamicSamplingConfig(max_rounds=2, on_cap="top_up", top_up_with_zero_advantage=True)
    with pytest.warns(DynamicSamplingCapWarning, match="topped up with 0 LSPO-dropped and 3 zero-advantage"):
        out = fill_batch(Generator(*rounds), 3, cfg)
    assert out.payloads == ["a", "b", "a"]  # generation order over both rounds
    assert out.sources == [TOP_UP_ZERO_ADVANTAGE] * 3
    assert (out.metrics.topped_up_zero_advantage, out.metrics.final_groups, out.metrics.shortfall) == (3, 3, 0)


def test_fills_across_rounds_without_warning(no_warnings):
    gen = Generator(
        [group([0, 1], 5, "r0a"), group([1, 1], 5, "r0b"), group([0, 0], 5, "r0c")],
        [group([0, 1], 5, "r1a"), group([1, 0], 5, "r1b"), group([1, 1], 5, "r1c")],
    )
    out = fill_batch(gen, target_groups=3, sampling=DynamicSamplingConfig(max_rounds=5))
    assert gen.calls == [0, 1]  # stops as soon as the batch is full
    assert out.payloads == ["r0a", "r1a", "r1b"] and out.sources == [KEPT] * 3
    m = out.metrics
    assert (m.rounds_used, m.cap_hit, m.prompts_generated, m.dropped_accuracy, m.final_groups) == (2, False, 6, 3, 3)


def test_excess_groups_are_dropped_not_carried_over(no_warnings):
    gen = Generator([group([0, 1], 5, f"p{i}") for i in range(5)])
    out = fill_batch(gen, target_groups=3, sampling=DynamicSamplingConfig())
    assert out.payloads == ["p0", "p1", "p2"]
    assert (out.metrics.excess_dropped, out.metrics.kept_lspo, out.metrics.final_groups) == (2, 5, 3)
    # the next step starts from scratch: nothing from the previous call leaks in
    out2 = fill_batch(Generator([group([0, 1], 5, "q0")]), target_groups=1, sampling=DynamicSamplingConfig())
    assert out2.payloads == ["q0"]


# Each LSPO round: variance groups with L = 10..50 (L = 30 dropped by LSPO) plus one zero-variance group.
def lspo_round(tag):
    return [group([0, 1], L, f"{tag}{L}") for L in (10, 20, 30, 40, 50)] + [group([1, 1], 7, f"{tag}zero")]


def test_top_up_fills_from_lspo_dropped_groups_first():
    cfg = DynamicSamplingConfig(max_rounds=2, on_cap="top_up")
    with pytest.warns(DynamicSamplingCapWarning, match="topped up with 2 LSPO-dropped and 0 zero-advantage"):
        out = fill_batch(Generator(lspo_round("a"), lspo_round("b")), 10, cfg, LSPOConfig())
    assert out.payloads == ["a10", "a20", "a40", "a50", "b10", "b20", "b40", "b50", "a30", "b30"]
    assert out.sources == [KEPT] * 8 + [TOP_UP_LSPO] * 2
    m = out.metrics
    assert (m.kept_accuracy, m.dropped_accuracy, m.kept_lspo, m.dropped_lspo) == (10, 2, 8, 2)
    assert (m.topped_up_lspo_dropped, m.topped_up_zero_advantage, m.shortfall) == (2, 0, 0)


def test_top_up_runs_out_and_trains_smaller():
    cfg = DynamicSamplingConfig(max_rounds=2, on_cap="top_up")
    with pytest.warns(DynamicSamplingCapWarning, match=r"topped up .* to 10 \(1 short\)"):
        out = fill_batch(Generator(lspo_round("a"), lspo_round("b")), 11, cfg, LSPOConfig())
    assert (out.metrics.final_groups, out.metrics.shortfall) == (10, 1)
    assert TOP_UP_ZERO_ADVANTAGE not in out.sources
    cfg = DynamicSamplingConfig(max_rounds=2, on_cap="top_up", top_up_with_zero_advantage=True)
    with pytest.warns(DynamicSamplingCapWarning):
        out = fill_batch(Generator(lspo_round("a"), lspo_round("b")), 11, cfg, LSPOConfig())
    assert out.payloads[-1] == "azero" and out.sources[-1] == TOP_UP_ZERO_ADVANTAGE
    assert (out.metrics.final_groups, out.metrics.shortfall) == (11, 0)


def test_train_smaller_policy():
    cfg = DynamicSamplingConfig(max_rounds=2, on_cap="train_smaller")
    with pytest.warns(DynamicSamplingCapWarning, match=r"smaller batch of 8 groups \(2 short\)"):
        out = fill_batch(Generator(lspo_round("a"), lspo_round("b")), 10, cfg, LSPOConfig())
    assert out.sources == [KEPT] * 8
    assert (out.metrics.final_groups, out.metrics.shortfall, out.metrics.topped_up_lspo_dropped) == (8, 2, 0)


def test_length_quantile_metrics_average_the_rounds(no_warnings):
    # round 0: passing L = 10..50 -> Q = 20, 40, 50; round 1: passing L = 1..5 (x10 later) -> Q = 2, 4, 5.
    r1 = [group([0, 1], L, f"s{L}") for L in (1, 2, 3, 4, 5)]
    out = fill_batch(Generator(lspo_round("a"), r1), 8, DynamicSamplingConfig(max_rounds=2), LSPOConfig())
    m = out.metrics
    assert [r.quantiles for r in out.rounds] == [LengthQuantiles(20, 40, 50), LengthQuantiles(2, 4, 5)]
    assert (m.q_low, m.q_high, m.q_max) == (11.0, 22.0, 27.5)
    assert m.mean_length_generated == pytest.approx((10 + 20 + 30 + 40 + 50 + 7 + 1 + 2 + 3 + 4 + 5) / 11)
    assert m.mean_length_final == pytest.approx((10 + 20 + 40 + 50 + 1 + 2 + 4 + 5) / 8)
    assert (m.rounds_used, m.cap_hit, m.final_groups) == (2, False, 8)


def test_bad_arguments_fail_before_generating():
    gen = Generator([group([0, 1], 5)])
    with pytest.raises(ValueError, match="target_groups"):
        fill_batch(gen, 0, DynamicSamplingConfig())
    with pytest.raises(TypeError, match="generate_round must be callable"):
        fill_batch([group([0, 1], 5)], 1, DynamicSamplingConfig())
    assert gen.calls == []
    with pytest.raises(TypeError, match=r"generate_round\(0\) returned a dict at position 1"):
        fill_batch(lambda r: [group([0, 1], 5), {"rewards": [0, 1]}], 1, DynamicSamplingConfig())


def test_generator_that_returns_nothing_stops_at_the_cap():
    # e.g. an exhausted prompt source: empty rounds must neither crash nor loop forever
    gen = Generator([])
    with pytest.warns(DynamicSamplingCapWarning, match=r"cap of 4 generation rounds.*0 prompts generated.*EMPTY"):
        out = fill_batch(gen, 3, DynamicSamplingConfig(max_rounds=4, on_cap="top_up"), LSPOConfig())
    assert gen.calls == [0, 1, 2, 3] and out.groups == []
    m = out.metrics
    assert (m.rounds_used, m.cap_hit, m.prompts_generated, m.final_groups, m.shortfall) == (4, True, 0, 0, 3)
    assert math.isnan(m.q_low) and math.isnan(m.mean_length_generated)


@pytest.mark.parametrize("returned, what", [(None, "NoneType"), (group([0, 1], 5), "GroupOutcome"),
                                            ({"rewards": [0, 1]}, "dict"), (3, "int")])
def test_generator_returning_something_else_than_a_list_of_groups(returned, what):
    with pytest.raises(TypeError, match=rf"generate_round\(0\) returned {what}; it must return a list of GroupOutcome"):
        fill_batch(lambda r: returned, 1, DynamicSamplingConfig())


def test_config_objects_of_the_wrong_type_fail_before_generating():
    gen = Generator([group([0, 1], 5)])
    with pytest.raises(TypeError, match="sampling must be a DynamicSamplingConfig, got dict"):
        fill_batch(gen, 1, {"max_rounds": 2})
    with pytest.raises(TypeError, match="lspo must be an LSPOConfig or None"):
        fill_batch(gen, 1, DynamicSamplingConfig(), DynamicSamplingConfig())
    assert gen.calls == []


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(accuracy_filter="no"), "dynamic_sampling.accuracy_filter: must be True or False"),
        (dict(on_cap="top_up", top_up_with_zero_advantage=1), "dynamic_sampling.top_up_with_zero_advantage: must be"),
        (dict(max_rounds=0), "dynamic_sampling.max_rounds"),
        (dict(max_rounds=2.5), "dynamic_sampling.max_rounds"),
        (dict(on_cap="wait"), "dynamic_sampling.on_cap"),
        (dict(reward_equal_atol=-1.0), "dynamic_sampling.reward_equal_atol"),
        (dict(top_up_with_zero_advantage=True), "top_up_with_zero_advantage"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DynamicSamplingConfig(**kwargs)


def test_group_outcome_validation():
    g = GroupOutcome(rewards=torch.tensor([0.0, 1.0]), response_lengths=torch.tensor([3, 4]))
    assert g.rewards == (0.0, 1.0) and g.response_lengths == (3, 4)
    with pytest.raises(ValueError, match="2 entries but response_lengths has 1"):
        GroupOutcome(rewards=[0, 1], response_lengths=[3])
    with pytest.raises(ValueError, match="rewards is empty"):
        GroupOutcome(rewards=[], response_lengths=[])
    with pytest.raises(ValueError, match="finite"):
        GroupOutcome(rewards=[0.0, float("nan")], response_lengths=[1, 2])
    with pytest.raises(ValueError, match="token counts"):
        GroupOutcome(rewards=[0, 1], response_lengths=[1, -2])
    with pytest.raises(ValueError, match="token counts"):
        GroupOutcome(rewards=[0, 1], response_lengths=[1, 2.5])
    with pytest.raises(ValueError, match="token counts"):
        GroupOutcome(rewards=[0, 1], response_lengths=[1, None])
    with pytest.raises(TypeError, match="GroupOutcome.rewards must be a sequence of numbers"):
        GroupOutcome(rewards="01", response_lengths=[1, 2])
    with pytest.raises(TypeError, match="GroupOutcome.rewards must be numbers"):
        GroupOutcome(rewards=[0, "x"], response_lengths=[1, 2])
