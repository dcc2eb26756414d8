"""parallel/thd_rope.py against megatron-core's own THD RoPE: the same output and input gradient bit for bit.

The CP group is only asked for its size and rank by both functions, so a two-integer stand-in serves (no process
group is needed to compute one rank's part).
"""
import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from megatron_rl.parallel.thd_rope import packed_rope_positions, use_packed_rope_positions

# Megatron's own function, whether or not this process applied the patch already
MEGATRON_THD = getattr(rope_utils._apply_rotary_pos_emb_thd, "__wrapped__", rope_utils._apply_rotary_pos_emb_thd)


class _CpGroup:
    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _cu_seqlens(generator, num_sequences: int, cp_size: int) -> torch.Tensor:
    """Random lengths padded to a multiple of 2*cp (what the actor's packing does)."""
    multiple = 2 * cp_size
    lengths = torch.randint(1, 40, (num_sequences,), generator=generator)
    lengths = (lengths + multiple - 1) // multiple * multiple
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)]).to(torch.int32)


def _run(function, t, cu, freqs, group, **kwargs):
    t = t.detach().clone().requires_grad_(True)
    out = function(t, cu, freqs, cp_group=group, **kwargs)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), t.grad


@pytest.mark.parametrize("cp_size", [1, 2, 4])
@pytest.mark.parametrize("exact_offsets", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
def test_the_patched_thd_rope_equals_megatrons_bit_for_bit(cp_size, exact_offsets, interleaved):
    use_packed_rope_positions()
    patched = rope_utils._apply_rotary_pos_emb_thd
    assert patched is not MEGATRON_THD
    generator = torch.Generator().manual_seed(cp_size * 10 + exact_offsets * 2 + interleaved)
    for trial in range(5):
        cu = _cu_seqlens(generator, num_sequences=1 + trial * 13, cp_size=cp_size)
        rows = int(cu[-1]) if exact_offsets else 64  # one row per packed position, or per position in a sequence
        freqs = torch.randn(rows, 1, 1, 16, generator=generator) * 3
        for rank in range(cp_size):
            tokens = int(cu[-1]) // cp_size
            t = torch.randn(tokens, 3, 24, generator=generator)  # rotary dim 16 of 24: a pass-through part too
            group = _CpGroup(cp_size, rank)
            expected = _run(MEGATRON_THD, t, cu, freqs, group, rotary_interleaved=interleaved)
            actual = _run(patched, t, cu, freqs, group, rotary_interleaved=interleaved)
            assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


def test_positions_are_the_slices_megatron_takes():
    cu = torch.tensor([0, 8, 12, 28], dtype=torch.int32)
    assert packed_rope_positions(cu).tolist() == [*range(8), *range(4), *range(16)]
    # CP 2, rank 1: chunks 1 and 2 of 4 per sequence
    assert packed_rope_positions(cu, 2, 1).tolist() == [2, 3, 4, 5, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11]
    assert packed_rope_positions(cu, 2, 0, with_offsets=True).tolist() == [0, 1, 6, 7, 8, 11, 12, 13, 14, 15, 24, 25,
                                                                           26, 27]


def test_what_megatron_refuses_it_still_refuses():
    """A batch whose lengths do not add up to the input's tokens goes to Megatron's function, which raises."""
    use_packed_rope_positions()
    cu = torch.tensor([0, 8, 12], dtype=torch.int32)
    with pytest.raises(RuntimeError):
        rope_utils._apply_rotary_pos_emb_thd(torch.randn(13, 2, 8), cu, torch.randn(16, 1, 1, 8), cp_group=_CpGroup(1, 0))
    use_packed_rope_positions()  # idempotent
    assert getattr(rope_utils._apply_rotary_pos_emb_thd, "_megatron_rl_packed_positions")
