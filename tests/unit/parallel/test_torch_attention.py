"""Packed (THD) attention without CP: the grouped padded SDPA equals one causal call per sequence."""
import pytest
import torch
import torch.nn.functional as F

from megatron_rl.parallel.torch_attention import length_buckets, packed_causal_attention


def _per_sequence_reference(query, key, value, lengths, scale):
    """The literal definition: each sequence attends causally to itself only (float64, one call per sequence)."""
    outputs, start = [], 0
    for n in lengths:
        q, k, v = (x[start:start + n].transpose(0, 1) for x in (query, key, value))
        if n:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            outputs.append(out.transpose(0, 1))
        start += n
    return torch.cat(outputs)


@pytest.mark.parametrize("lengths", [
    [5, 5, 5, 5],                     # equal lengths: the reshape path
    [1, 7, 0, 3, 12, 2, 12, 1],       # empty and length-1 sequences, ties, several groups
    [40] + [2] * 30,                  # one long among many short: must not pad everything to 40
    [9],
])
def test_grouped_attention_equals_per_sequence_attention(lengths):
    torch.manual_seed(0)
    t, hq, hkv, d = sum(lengths), 4, 2, 8  # GQA: 2 query heads per KV head
    tensors = [torch.randn(t, h, d, dtype=torch.float64, requires_grad=True) for h in (hq, hkv, hkv)]
    grad_out = torch.randn(t, hq, d, dtype=torch.float64)
    scale = d ** -0.5

    out = packed_causal_attention(*tensors, lengths, scale)
    grads = torch.autograd.grad(out, tensors, grad_out)
    ref = _per_sequence_reference(*tensors, lengths, scale)
    ref_grads = torch.autograd.grad(ref, tensors, grad_out)

    # float64, same math, only SDPA's summation order differs: 1e-12 absolute
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_buckets_cover_every_sequence_once_and_bound_the_padding():
    lengths = [40] + [2] * 30 + [0, 17, 18, 1]
    groups = length_buckets(lengths, max_padded_per_real=2.0)
    members = sorted(i for g in groups for i in g)
    assert members == [i for i, n in enumerate(lengths) if n > 0]
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert lengths[g[0]] == longest
        assert len(g) * longest <= 2.0 * sum(lengths[i] for i in g) or len(g) == 1
    group_of_longest = next(g for g in groups if 0 in g)
    assert all(lengths[i] > 2 for i in group_of_longest)  # the 40-token sequence is not padded with the 2-token ones
    assert len(groups) < len(members) / 4  # and the short ones share calls


def test_bad_inputs():
    x = torch.zeros(5, 2, 4)
    with pytest.raises(ValueError, match="sum to 6 but the input has 5"):
        packed_causal_attention(x, x, x, [3, 3], 1.0)
    with pytest.raises(ValueError, match="max_padded_per_real"):
        length_buckets([1, 2], max_padded_per_real=0.5)
