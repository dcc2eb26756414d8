"""LSPO's quantile rule (arXiv 2510.01459, Sec. 3) on hand-computed batches: ties, tiny batches, all-equal lengths,
a batch where everything is filtered, and both quantile definitions."""
import numpy as np
import pytest
import torch

from megatron_rl.algorithms.lspo import (
    LengthQuantiles,
    LSPOConfig,
    empirical_quantiles,
    group_mean_lengths,
    lspo_keep_mask,
)

LINEAR = LSPOConfig(quantile_method="linear")


def kept(lengths, config=LSPOConfig()):
    mask, q = lspo_keep_mask(torch.tensor(lengths, dtype=torch.float64), config)
    return [x for x, k in zip(lengths, mask.tolist()) if k], q


def test_ten_prompts_paper_defaults_inverted_cdf():
    # Q(a) = x_(ceil(10 a)): Q(.3) = x_(3) = 3, Q(.65) = x_(7) = 7, Q(.95) = x_(10) = 10.
    # Given in shuffled order so the mask must follow positions, not ranks.
    lengths = [7.0, 1.0, 10.0, 4.0, 3.0, 9.0, 5.0, 2.0, 8.0, 6.0]
    keep, q = kept(lengths)
    assert q == LengthQuantiles(low=3.0, high=7.0, max=10.0)
    assert keep == [7.0, 1.0, 10.0, 3.0, 9.0, 2.0, 8.0]


def test_ten_prompts_linear_interpolation():
    # torch.quantile linear: position (n - 1) a = 2.7, 5.85, 8.55 -> 3.7, 6.85, 9.55; 10 is above Q(L_max).
    keep, q = kept([float(x) for x in range(1, 11)], LINEAR)
    assert (q.low, q.high, q.max) == pytest.approx((3.7, 6.85, 9.55), abs=1e-12)
    assert keep == [1.0, 2.0, 3.0, 7.0, 8.0, 9.0]


def test_float_noise_does_not_shift_a_rank():
    # 25 * 0.28 == 7.000000000000001 and 100 * 0.55 == 55.00000000000001 in floats: a naive ceil would pick
    # x_(8) and x_(56) instead of x_(7) and x_(55).
    assert empirical_quantiles(torch.arange(1.0, 26.0), [0.28]).item() == 7.0
    assert empirical_quantiles(torch.arange(1.0, 101.0), [0.55]).item() == 55.0
    assert kept([float(x) for x in range(1, 26)], LSPOConfig(low_quantile=0.28))[1].low == 7.0
    assert empirical_quantiles(torch.arange(1.0, 11.0), [0.3]).item() == 3.0
    # 20 * 0.95 == 19: L_max first removes something at n = 20 (the single longest prompt).
    keep, q = kept([float(x) for x in range(1, 21)])
    assert q == LengthQuantiles(low=6.0, high=13.0, max=19.0)
    assert 20.0 not in keep and 19.0 in keep and len(keep) == 6 + 7


def test_ties_at_the_low_threshold_are_all_kept():
    # sorted [1,2,2,2,5,6,7,8,9,10]: Q(.3) = x_(3) = 2, so all three 2s are kept (4 short prompts, not 3).
    keep, q = kept([2.0, 5.0, 1.0, 2.0, 6.0, 2.0, 7.0, 8.0, 9.0, 10.0])
    assert q == LengthQuantiles(low=2.0, high=7.0, max=10.0)
    assert sorted(keep) == [1.0, 2.0, 2.0, 2.0, 7.0, 8.0, 9.0, 10.0]


def test_ties_at_the_high_threshold_are_all_kept():
    # sorted [1,2,3,4,5,6,6,6,9,10]: Q(.65) = x_(7) = 6, so x_(6) = 6 is kept too.
    keep, q = kept([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.0, 6.0, 9.0, 10.0])
    assert q == LengthQuantiles(low=3.0, high=6.0, max=10.0)
    assert keep == [1.0, 2.0, 3.0, 6.0, 6.0, 6.0, 9.0, 10.0]


@pytest.mark.parametrize("config", [LSPOConfig(), LINEAR], ids=["inverted_cdf", "linear"])
def test_all_lengths_equal_keeps_everything(config):
    keep, q = kept([4.0] * 5, config)
    assert keep == [4.0] * 5
    assert q == LengthQuantiles(low=4.0, high=4.0, max=4.0)


def test_tiny_batches_inverted_cdf():
    # n = 1: every quantile is the value itself.
    assert kept([7.0]) == ([7.0], LengthQuantiles(7.0, 7.0, 7.0))
    # n = 2: Q(.3) = x_(ceil .6) = x_(1); Q(.65) = x_(ceil 1.3) = x_(2); Q(.95) = x_(ceil 1.9) = x_(2).
    assert kept([9.0, 3.0]) == ([9.0, 3.0], LengthQuantiles(3.0, 9.0, 9.0))
    # n = 3: x_(1), x_(ceil 1.95) = x_(2), x_(ceil 2.85) = x_(3): the middle one sits on Q(L_high), all kept.
    assert kept([5.0, 11.0, 2.0]) == ([5.0, 11.0, 2.0], LengthQuantiles(2.0, 5.0, 11.0))
    # n = 5: x_(2), x_(4), x_(5): only the median is dropped.
    assert kept([1.0, 2.0, 3.0, 4.0, 5.0]) == ([1.0, 2.0, 4.0, 5.0], LengthQuantiles(2.0, 4.0, 5.0))


def test_tiny_batches_linear():
    # n = 2 [3, 9]: 3 + .3*6 = 4.8, 3 + .65*6 = 6.9, 3 + .95*6 = 8.7 -> only 3 survives.
    keep, q = kept([3.0, 9.0], LINEAR)
    assert keep == [3.0] and (q.low, q.high, q.max) == pytest.approx((4.8, 6.9, 8.7), abs=1e-12)
    # n = 3 [2, 5, 11]: positions .6, 1.3, 1.9 -> 3.8, 6.8, 10.4 -> only 2 survives.
    keep, q = kept([2.0, 5.0, 11.0], LINEAR)
    assert keep == [2.0] and (q.low, q.high, q.max) == pytest.approx((3.8, 6.8, 10.4), abs=1e-12)


def test_keep_one_band_only():
    lengths = [1.0, 2.0, 3.0, 4.0, 5.0]  # Q = 2, 4, 5
    assert kept(lengths, LSPOConfig(keep="short"))[0] == [1.0, 2.0]
    assert kept(lengths, LSPOConfig(keep="long"))[0] == [4.0, 5.0]


def test_a_batch_where_everything_is_filtered():
    # keep="long" with linear quantiles on [3, 9]: the band [6.9, 8.7] contains neither prompt.
    mask, q = lspo_keep_mask(torch.tensor([3.0, 9.0]), LSPOConfig(keep="long", quantile_method="linear"))
    assert mask.tolist() == [False, False]
    assert q.high == pytest.approx(6.9) and q.max == pytest.approx(8.7)


def test_empty_batch_and_disabled_config():
    mask, q = lspo_keep_mask(torch.zeros(0, dtype=torch.float64), LSPOConfig())
    assert mask.shape == (0,) and mask.dtype == torch.bool and q is None
    mask, q = lspo_keep_mask(torch.tensor([1.0, 50.0, 3.0]), LSPOConfig(enabled=False))
    assert mask.tolist() == [True, True, True] and q is None


def test_matches_numpy_and_torch_references_on_random_batches_with_ties():
    gen = torch.Generator().manual_seed(0)
    for n in list(range(1, 25)) + [64, 257]:
        values = torch.randint(0, max(2, n // 2), (n,), generator=gen).to(torch.float64)  # many ties
        levels = [0.05, 0.3, 0.5, 0.65, 0.95, 1.0]
        ours = empirical_quantiles(values, levels, "inverted_cdf").tolist()
        ref = [float(np.quantile(values.numpy(), a, method="inverted_cdf")) for a in levels]
        assert ours == ref, (n, ours, ref)  # both pick an element of the batch: exact equality
        lin = empirical_quantiles(values, levels, "linear")
        assert torch.equal(lin, torch.quantile(values, torch.tensor(levels, dtype=torch.float64)))


def test_group_mean_lengths():
    assert group_mean_lengths([[1, 2], [3, 3, 3], [0]]).tolist() == [1.5, 3.0, 0.0]
    with pytest.raises(ValueError, match=r"response_lengths\[1\] is empty"):
        group_mean_lengths([[1], []])


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        empirical_quantiles(torch.zeros(0), [0.5])
    with pytest.raises(ValueError, match="finite"):
        empirical_quantiles(torch.tensor([1.0, float("nan")]), [0.5])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        empirical_quantiles(torch.tensor([1.0]), [0.0])
    with pytest.raises(ValueError, match="1-D"):
        lspo_keep_mask(torch.zeros(2, 2), LSPOConfig())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(enabled="false"), "lspo.enabled: must be True or False"),
        (dict(low_quantile=0.0), "lspo.low_quantile"),
        (dict(max_quantile=1.5), "lspo.max_quantile"),
        (dict(high_quantile="0.6"), "lspo.high_quantile"),
        (dict(low_quantile=0.7), "low_quantile <= high_quantile <= max_quantile"),
        (dict(keep="middle"), "lspo.keep"),
        (dict(quantile_method="nearest"), "lspo.quantile_method"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        LSPOConfig(**kwargs)
