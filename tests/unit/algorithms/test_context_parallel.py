"""CP layout helpers (single process): Megatron's load-balanced split, its inverse and the local positions."""
import pytest
import torch

from megatron_rl.algorithms import cp_chunk_ranges, cp_local_positions, merge_cp_parts, split_for_cp
from megatron_rl.algorithms.context_parallel import reduce_sequence_sums


def test_chunk_ranges_cp2():
    # T = 8, cp = 2: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 holds chunks 1 and 2.
    assert cp_chunk_ranges(8, 2, 0) == ((0, 2), (6, 8))
    assert cp_chunk_ranges(8, 2, 1) == ((2, 4), (4, 6))


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_split_positions_and_merge_are_consistent(cp):
    x = torch.arange(3 * 16).view(3, 16)
    parts = [split_for_cp(x, cp, r) for r in range(cp)]
    for r, part in enumerate(parts):
        assert torch.equal(part, x[:, cp_local_positions(16, cp, r)])
    assert torch.equal(merge_cp_parts(parts), x)
    # every position is held by exactly one rank
    assert sorted(torch.cat([cp_local_positions(16, cp, r) for r in range(cp)]).tolist()) == list(range(16))


def test_split_along_another_dim_and_gradient_flows():
    x = torch.randn(16, 2, requires_grad=True)
    part = split_for_cp(x, 2, 1, dim=0)
    part.sum().backward()
    assert x.grad[:, 0].tolist() == [0] * 4 + [1] * 8 + [0] * 4


def test_errors():
    with pytest.raises(ValueError, match=r"not divisible by 2\*cp_size=4: pad"):
        split_for_cp(torch.zeros(2, 6), 2, 0)
    with pytest.raises(ValueError, match=r"cp_rank must be in \[0, 2\)"):
        cp_chunk_ranges(8, 2, 2)
    with pytest.raises(ValueError, match="same shape"):
        merge_cp_parts([torch.zeros(2, 4), torch.zeros(2, 6)])


def test_reduce_without_group_is_a_detached_copy():
    x = torch.randn(3, 2, requires_grad=True)
    y = reduce_sequence_sums(x, None)
    assert torch.equal(y, x.detach()) and not y.requires_grad
