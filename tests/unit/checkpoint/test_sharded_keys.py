"""Megatron dist-checkpoint keys -> canonical Megatron names, for each layout Megatron-Core 0.16.1 writes."""
import pytest
import torch

from megatron_rl.checkpoint.dcp_reader import DistCheckpointError, TensorInfo
from megatron_rl.checkpoint.sharded_keys import TensorSource, canonical_sources


def infos(**shapes):
    return {k.replace("__", "."): TensorInfo(k.replace("__", "."), s, torch.float32) for k, s in shapes.items()}


def as_dict(sources):
    return {name: ([(p.key, p.index) for p in s.parts], s.shape) for name, s in sources.items()}


def test_per_layer_keys_with_fused_norm_names():
    got = as_dict(canonical_sources(infos(**{
        "decoder__layers__3__self_attention__linear_qkv__layer_norm_weight": (8,),
        "decoder__layers__3__mlp__linear_fc1__layer_norm_weight": (8,),
        "decoder__layers__3__self_attention__linear_qkv__weight": (16, 8),
        "embedding__word_embeddings__weight": (10, 8),
    })))
    assert got == {
        "decoder.layers.3.input_layernorm.weight": ([("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight", ())], (8,)),
        "decoder.layers.3.pre_mlp_layernorm.weight": ([("decoder.layers.3.mlp.linear_fc1.layer_norm_weight", ())], (8,)),
        "decoder.layers.3.self_attention.linear_qkv.weight": ([("decoder.layers.3.self_attention.linear_qkv.weight", ())], (16, 8)),
        "embedding.word_embeddings.weight": ([("embedding.word_embeddings.weight", ())], (10, 8)),
    }


def test_layer_stacked_keys_expand_to_one_name_per_layer():
    got = as_dict(canonical_sources(infos(decoder__layers__mlp__linear_fc2__weight=(3, 8, 16))))
    assert got == {
        f"decoder.layers.{i}.mlp.linear_fc2.weight": ([("decoder.layers.mlp.linear_fc2.weight", (i,))], (8, 16))
        for i in range(3)
    }


def test_expert_stacked_keys_per_layer_and_layer_stacked():
    per_layer = as_dict(canonical_sources(infos(decoder__layers__1__mlp__experts__experts__linear_fc1__weight=(4, 6, 8))))
    assert per_layer["decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"] == (
        [("decoder.layers.1.mlp.experts.experts.linear_fc1.weight", (3,))], (6, 8))
    assert len(per_layer) == 4
    stacked = as_dict(canonical_sources(infos(decoder__layers__mlp__experts__experts__linear_fc2__weight=(2, 4, 8, 3))))
    assert stacked["decoder.layers.1.mlp.experts.local_experts.2.linear_fc2.weight"] == (
        [("decoder.layers.mlp.experts.experts.linear_fc2.weight", (1, 2))], (8, 3))
    assert len(stacked) == 8


def test_singleton_local_shards_glu_halves_are_joined_gate_then_up():
    sources = canonical_sources(infos(**{
        "decoder__layers__0__mlp__experts__experts__5__linear_fc1__weight_v": (3, 8),
        "decoder__layers__0__mlp__experts__experts__5__linear_fc1__weight_w": (3, 8),
        "decoder__layers__0__mlp__linear_fc1__weight_w": (4, 8),
        "decoder__layers__0__mlp__linear_fc1__weight_v": (4, 8),
    }))
    expert = sources["decoder.layers.0.mlp.experts.local_experts.5.linear_fc1.weight"]
    assert expert.parts == (TensorSource("decoder.layers.0.mlp.experts.experts.5.linear_fc1.weight_w"),
                            TensorSource("decoder.layers.0.mlp.experts.experts.5.linear_fc1.weight_v"))
    assert expert.shape == (6, 8)
    dense = sources["decoder.layers.0.mlp.linear_fc1.weight"]
    assert [p.key for p in dense.parts] == ["decoder.layers.0.mlp.linear_fc1.weight_w", "decoder.layers.0.mlp.linear_fc1.weight_v"]
    assert dense.shape == (8, 8)


def test_a_lone_glu_half_is_an_error():
    with pytest.raises(DistCheckpointError, match="only one SwiGLU half"):
        canonical_sources(infos(decoder__layers__0__mlp__linear_fc1__weight_w=(4, 8)))


def test_the_same_tensor_stored_twice_is_an_error():
    with pytest.raises(DistCheckpointError, match="stores 'decoder.layers.1.mlp.linear_fc2.weight' twice"):
        canonical_sources(infos(decoder__layers__mlp__linear_fc2__weight=(2, 8, 16),
                                decoder__layers__1__mlp__linear_fc2__weight=(8, 16)))
