"""HF config.json -> QwenArch: what is supported maps faithfully, everything else fails naming the field."""
import json

import pytest

from megatron_rl.models.qwen_arch import ModelConfigError, arch_from_dict, load_arch

QWEN25_7B = {  # the released Qwen2.5-7B-Instruct config.json (transformers 4.x layout)
    "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "vocab_size": 152064,
}
QWEN3_30B_A3B = {  # the released Qwen3-30B-A3B config.json
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "decoder_sparse_step": 1, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 151936,
}


def test_qwen25_7b():
    a = arch_from_dict(QWEN25_7B)
    assert (a.qkv_bias, a.qk_norm, a.moe) == (True, False, None)
    assert (a.head_dim, a.num_kv_heads, a.rope_theta) == (128, 4, 1e6)
    assert 7.0e9 < a.num_parameters < 7.7e9  # Qwen2.5-7B has 7.61B parameters


def test_qwen3_30b_a3b():
    a = arch_from_dict(QWEN3_30B_A3B)
    assert a.qk_norm and not a.qkv_bias
    assert (a.moe.num_experts, a.moe.top_k, a.moe.expert_ffn_hidden_size) == (128, 8, 768)
    assert a.moe.norm_topk_prob and all(a.moe.moe_layers)
    assert 30.0e9 < a.num_parameters < 31.0e9  # 30.5B total parameters


def test_transformers5_layout(tiny_model):
    """transformers 5 writes rope_parameters and num_local_experts; both are read."""
    a = load_arch(tiny_model("qwen3_moe"))
    assert a.rope_theta == 1e6 and a.moe.num_experts == 4


def test_mixed_dense_and_moe_layers():
    cfg = dict(QWEN3_30B_A3B, num_hidden_layers=4, mlp_only_layers=[0], decoder_sparse_step=2)
    assert arch_from_dict(cfg).moe.moe_layers == (False, True, False, True)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"model_type": "qwen2_moe"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "rope_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"num_experts_per_tok": 256}, "num_experts_per_tok"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"hidden_size": "big"}, "hidden_size"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"mlp_only_layers": [99]}, "mlp_only_layers"),
    ],
)
def test_unsupported_fields_are_named(change, field):
    with pytest.raises(ModelConfigError, match=field):
        arch_from_dict({**QWEN3_30B_A3B, **change})


def test_missing_field_is_named():
    cfg = dict(QWEN25_7B)
    del cfg["intermediate_size"]
    with pytest.raises(ModelConfigError, match="intermediate_size"):
        arch_from_dict(cfg)


def test_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        load_arch(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_arch(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    assert load_arch(tmp_path).model_type == "qwen2"
