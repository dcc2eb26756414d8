"""Parallel layouts are validated against the world size and the model before any process group exists."""
import pytest

from megatron_rl.models.qwen_arch import arch_from_dict
from megatron_rl.parallel.layout import ParallelLayout, ParallelLayoutError
from tests.unit.models.test_qwen_arch import QWEN3_30B_A3B, QWEN25_7B

DENSE, MOE = arch_from_dict(QWEN25_7B), arch_from_dict(QWEN3_30B_A3B)


@pytest.mark.parametrize(
    "layout, world, dp",
    [
        (ParallelLayout(), 1, 1),
        (ParallelLayout(tp=2, pp=2), 8, 2),
        (ParallelLayout(tp=2, cp=2), 8, 2),
        (ParallelLayout(ep=8, tp=1), 8, 8),  # experts span the data-parallel ranks
        (ParallelLayout(ep=8, tp=2, pp=2), 32, 8),
    ],
)
def test_data_parallel_size(layout, world, dp):
    assert layout.data_parallel_size(world) == dp


def test_scale_plan_layouts_fit_their_models():
    ParallelLayout(tp=4, pp=1).validate(16, DENSE)  # Qwen2.5-7B on 2 nodes
    ParallelLayout(tp=2, pp=2, ep=8).validate(32, MOE)  # Qwen3-30B-A3B on 4 nodes


@pytest.mark.parametrize(
    "layout, arch, world, match",
    [
        (ParallelLayout(tp=8), DENSE, 8, "num_attention_heads=28"),
        (ParallelLayout(tp=8), MOE, 8, "num_key_value_heads"),
        (ParallelLayout(ep=3), MOE, 3, "num_experts=128"),
        (ParallelLayout(ep=2), DENSE, 2, "needs a MoE model"),
        (ParallelLayout(pp=5), DENSE, 5, "num_hidden_layers=28"),
        (ParallelLayout(tp=2, pp=2), DENSE, 6, "parallel.tp x parallel.pp x parallel.cp = 2x2x1 = 4 does not divide"),
        (ParallelLayout(ep=4, pp=2), MOE, 6, "parallel.etp x parallel.ep x parallel.pp"),
        (ParallelLayout(etp=5), MOE, 5, "moe_intermediate_size"),
    ],
)
def test_bad_layouts_name_the_setting(layout, arch, world, match):
    with pytest.raises(ParallelLayoutError, match=match):
        layout.validate(world, arch)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"tp": 0}, "parallel.tp"), ({"vpp": 2}, "parallel.vpp"), ({"tp": 1, "sequence_parallel": True}, "sequence_parallel")],
)
def test_bad_values(kwargs, match):
    with pytest.raises(ParallelLayoutError, match=match):
        ParallelLayout(**kwargs)


def test_sequence_parallel_defaults_on_with_tp():
    assert ParallelLayout(tp=2).use_sequence_parallel and not ParallelLayout().use_sequence_parallel


def test_dense_mlp_size_only_checked_where_a_dense_mlp_exists():
    """intermediate_size is the dense MLP's: irrelevant to an all-MoE model, checked once a layer is dense."""
    odd = {**QWEN3_30B_A3B, "intermediate_size": 6145}
    ParallelLayout(tp=2).validate(2, arch_from_dict(odd))
    with pytest.raises(ParallelLayoutError, match="intermediate_size=6145"):
        ParallelLayout(tp=2).validate(2, arch_from_dict({**odd, "mlp_only_layers": [0]}))
    with pytest.raises(ParallelLayoutError, match="intermediate_size"):
        ParallelLayout(tp=2).validate(2, arch_from_dict({**QWEN25_7B, "intermediate_size": 18945}))
