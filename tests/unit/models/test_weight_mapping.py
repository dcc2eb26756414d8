"""HF <-> Megatron tensor layouts, checked against independent constructions of Megatron's layouts."""
import pytest
import torch

from megatron_rl.models.qwen_arch import arch_from_dict
from megatron_rl.models.weight_mapping import (
    all_mappings,
    canonical_name,
    expected_hf_names,
    merge_qkv,
    shard_for_rank,
    split_qkv,
    unshard,
)
from tests.unit.models.test_qwen_arch import QWEN3_30B_A3B, QWEN25_7B

SMALL = arch_from_dict({**QWEN25_7B, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2,
                        "num_hidden_layers": 2, "intermediate_size": 32, "vocab_size": 64})


def test_qkv_layout_matches_megatron_group_interleaving():
    """Megatron's linear_qkv rows: for each KV group g: its 3 query heads, then k_g, then v_g (head_dim rows each)."""
    d, h = SMALL.head_dim, SMALL.hidden_size
    q, k, v = torch.randn(6 * d, h), torch.randn(2 * d, h), torch.randn(2 * d, h)
    rows = []
    for g in range(2):
        rows += [q[(3 * g + i) * d:(3 * g + i + 1) * d] for i in range(3)]
        rows += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    expected = torch.cat(rows)
    assert torch.equal(merge_qkv(q, k, v, SMALL), expected)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(expected, SMALL), (q, k, v)))


def test_qkv_bias_roundtrip():
    d = SMALL.head_dim
    q, k, v = torch.randn(6 * d), torch.randn(2 * d), torch.randn(2 * d)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(merge_qkv(q, k, v, SMALL), SMALL), (q, k, v)))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_glu_tp_shards_hold_gate_and_up_slices(tp):
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    full = torch.cat([gate, up])
    shards = [shard_for_rank(full, 0, True, r, tp) for r in range(tp)]
    for r, shard in enumerate(shards):  # rank r: [gate_r; up_r]
        assert torch.equal(shard, torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]))
    assert torch.equal(unshard(shards, 0, True), full)


@pytest.mark.parametrize("dim", [0, 1])
def test_plain_tp_shards_roundtrip(dim):
    full = torch.randn(8, 4)
    shards = [shard_for_rank(full, dim, False, r, 2) for r in range(2)]
    assert torch.equal(unshard(shards, dim, False), full)
    assert shard_for_rank(full, None, False, 1, 2) is full


def test_canonical_names_map_local_layers_experts_and_te_aliases():
    offsets = {0: 4, 1: 5}  # a second pipeline stage holding global layers 4 and 5
    assert canonical_name("decoder.layers.1.self_attention.linear_qkv.weight", offsets, 0) == \
        "decoder.layers.5.self_attention.linear_qkv.weight"
    assert canonical_name("decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight", offsets, 64) == \
        "decoder.layers.4.mlp.experts.local_experts.65.linear_fc2.weight"
    assert canonical_name("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", offsets, 0) == \
        "decoder.layers.4.input_layernorm.weight"
    assert canonical_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", offsets, 0) == \
        "decoder.layers.4.pre_mlp_layernorm.weight"
    assert canonical_name("decoder.layers.1.mlp.experts.linear_fc1.weight3", offsets, 8) == \
        "decoder.layers.5.mlp.experts.local_experts.11.linear_fc1.weight"
    assert canonical_name("embedding.word_embeddings.weight", offsets, 0) == "embedding.word_embeddings.weight"


def test_every_hf_tensor_is_mapped_once():
    moe = arch_from_dict(QWEN3_30B_A3B)
    names = expected_hf_names(moe)
    assert len(names) == len(set(names))
    # 48 layers x (q,k,v,o, 2 norms, q/k-norm, router, 128 experts x 3) + embed + norm + head
    assert len(names) == 48 * (4 + 2 + 2 + 1 + 128 * 3) + 3
    assert len(all_mappings(moe)) == 48 * (1 + 1 + 2 + 1 + 1 + 1 + 128 * 2) + 3
