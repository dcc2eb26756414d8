"""LossMetrics: (sum, count) pairs merge exactly and report means."""
import math

import torch

from megatron_rl.algorithms import LossMetrics


def test_merge_is_exact_where_a_mean_of_means_is_not():
    a = LossMetrics().add("x", 3.0, 1)          # one item of value 3
    b = LossMetrics().add("x", 2.0, 4)          # four items summing to 2
    merged = LossMetrics().merge(a).merge(b)
    assert merged.pair("x") == (5.0, 5.0)
    assert merged.means() == {"x": 1.0}         # a mean of the two means would say 1.75


def test_zero_count_reports_nan_and_reduce_without_groups_is_identity():
    m = LossMetrics().add("empty", torch.tensor(0.0), torch.tensor(0)).add("y", 1.0, 2)
    assert math.isnan(m.means()["empty"])
    assert m.reduce(None).pair("y") == (1.0, 2.0)
    assert m.names() == ["empty", "y"]
