"""Read a Hugging Face Qwen `config.json` into one normalised, validated architecture description.

Supported (the families this project trains):
- `qwen2`  (Qwen2 / Qwen2.5 dense): bias on q/k/v projections, no bias on o_proj, no qk-norm.
- `qwen3`  (Qwen3 dense): no attention bias, RMSNorm on each head's q and k (qk-norm) before RoPE.
- `qwen3_moe` (Qwen3-MoE, e.g. Qwen3-30B-A3B): qk-norm; MLP replaced by a softmax top-k router over
  `num_experts` SwiGLU experts; `norm_topk_prob` renormalises the selected probabilities;
  `decoder_sparse_step` / `mlp_only_layers` choose which layers are MoE (the rest are dense SwiGLU).

The raw JSON is parsed (not a `transformers` config class) so configs written by any transformers version work:
both `rope_theta` (<= 4.x) and `rope_parameters.rope_theta` (5.x), `num_experts` and `num_local_experts`.
Anything that would change the math and that we do not implement (RoPE scaling, sliding-window attention, a
non-SiLU activation, biases we do not map) is refused with an error naming the field, so a model is never built
silently wrong.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe")


class ModelConfigError(ValueError):
    """An HF config that this project cannot represent faithfully (the message names the field)."""


@dataclass(frozen=True)
class MoEArch:
    num_experts: int
    top_k: int
    expert_ffn_hidden_size: int
    norm_topk_prob: bool
    # moe_layers[i] is True when decoder layer i uses the MoE block (else a dense SwiGLU MLP).
    moe_layers: tuple[bool, ...]
    router_aux_loss_coef: float = 0.0

    @property
    def routed_layers(self) -> list[int]:
        """The 0-based decoder layers with experts, ascending (the layer axis of routed-experts arrays)."""
        return [i for i, routed in enumerate(self.moe_layers) if routed]


@dataclass(frozen=True)
class QwenArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    moe: MoEArch | None = None
    torch_dtype: str = "float32"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def num_parameters(self) -> int:
        """Parameter count of the HF model (embeddings counted once when tied)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (self.num_attention_heads + 2 * self.num_kv_heads) + self.num_attention_heads * d * h
        if self.qkv_bias:
            attn += d * (self.num_attention_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * d
        dense_mlp = 3 * h * self.ffn_hidden_size
        total = 0
        for layer in range(self.num_layers):
            total += attn + 2 * h
            if self.moe is not None and self.moe.moe_layers[layer]:
                total += self.moe.num_experts * 3 * h * self.moe.expert_ffn_hidden_size + self.moe.num_experts * h
            else:
                total += dense_mlp
        total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        return total


def _require(cfg: dict, key: str, kind=int):
    if key not in cfg or cfg[key] is None:
        raise ModelConfigError(f"config.json is missing required field '{key}'")
    value = cfg[key]
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ModelConfigError(f"config.json field '{key}' must be an integer, got {value!r}")
    if kind is float and not isinstance(value, (int, float)):
        raise ModelConfigError(f"config.json field '{key}' must be a number, got {value!r}")
    if kind is int and value <= 0:
        raise ModelConfigError(f"config.json field '{key}' must be positive, got {value}")
    return value


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type != "default":
        raise ModelConfigError(
            f"config.json field 'rope_parameters.rope_type' is {rope_type!r}; only 'default' RoPE is supported "
            "(RoPE scaling such as YaRN is not implemented for the Megatron model)"
        )
    if scaling:
        scaling_type = scaling.get("rope_type") or scaling.get("type")
        if scaling_type not in (None, "default"):
            raise ModelConfigError(
                f"config.json field 'rope_scaling' is {scaling!r}; RoPE scaling is not supported — remove it "
                "(train at the native context length) or use a checkpoint without it"
            )
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise ModelConfigError("config.json has neither 'rope_theta' nor 'rope_parameters.rope_theta'")
    return float(theta)


def _moe_layers(cfg: dict, num_layers: int) -> tuple[bool, ...]:
    step = cfg.get("decoder_sparse_step", 1) or 1
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    bad = [i for i in mlp_only if not (isinstance(i, int) and 0 <= i < num_layers)]
    if bad:
        raise ModelConfigError(f"config.json field 'mlp_only_layers' has out-of-range layer indices {bad}")
    # transformers Qwen3MoeDecoderLayer: MoE iff layer not in mlp_only_layers and (idx + 1) % step == 0
    return tuple((i not in mlp_only) and ((i + 1) % step == 0) for i in range(num_layers))


def arch_from_dict(cfg: dict[str, Any]) -> QwenArch:
    """Validate an HF config dict and return its normalised architecture."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(
            f"config.json field 'model_type' is {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ModelConfigError(f"config.json field 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is supported")
    if cfg.get("use_sliding_window"):
        raise ModelConfigError(
            "config.json field 'use_sliding_window' is true; sliding-window attention is not supported"
        )
    layer_types = cfg.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ModelConfigError(
            "config.json field 'layer_types' contains non-'full_attention' layers; only full attention is supported"
        )

    num_layers = _require(cfg, "num_hidden_layers")
    hidden = _require(cfg, "hidden_size")
    heads = _require(cfg, "num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ModelConfigError(
            f"config.json: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
        )
    head_dim = cfg.get("head_dim") or hidden // heads
    if model_type == "qwen2" and hidden % heads:
        raise ModelConfigError(f"config.json: hidden_size ({hidden}) must divide by num_attention_heads ({heads})")

    if model_type == "qwen2":
        qkv_bias, qk_norm = True, False
    else:
        if cfg.get("attention_bias"):
            raise ModelConfigError(
                f"config.json field 'attention_bias' is true for {model_type}; biases on q/k/v/o projections of "
                "Qwen3 are not supported (released Qwen3 checkpoints have none)"
            )
        qkv_bias, qk_norm = False, True

    moe = None
    if model_type == "qwen3_moe":
        num_experts = cfg.get("num_experts", cfg.get("num_local_experts"))
        if not isinstance(num_experts, int) or num_experts <= 0:
            raise ModelConfigError("config.json field 'num_experts' must be a positive integer for qwen3_moe")
        top_k = _require(cfg, "num_experts_per_tok")
        if top_k > num_experts:
            raise ModelConfigError(
                f"config.json: num_experts_per_tok ({top_k}) exceeds num_experts ({num_experts})"
            )
        if cfg.get("shared_expert_intermediate_size"):
            raise ModelConfigError("config.json field 'shared_expert_intermediate_size': shared experts unsupported")
        moe = MoEArch(
            num_experts=num_experts,
            top_k=top_k,
            expert_ffn_hidden_size=_require(cfg, "moe_intermediate_size"),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            moe_layers=_moe_layers(cfg, num_layers),
            router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0) or 0.0),
        )
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return QwenArch(
        model_type=model_type,
        vocab_size=_require(cfg, "vocab_size"),
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=_require(cfg, "intermediate_size"),
        rms_norm_eps=float(_require(cfg, "rms_norm_eps", float)),
        rope_theta=_rope_theta(cfg),
        max_position_embeddings=_require(cfg, "max_position_embeddings"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        moe=moe,
        torch_dtype=str(dtype),
        raw=dict(cfg),
    )


def load_arch(hf_dir: str | os.PathLike) -> QwenArch:
    """Read and validate `<hf_dir>/config.json`."""
    path = os.path.join(os.fspath(hf_dir), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {hf_dir!s}: expected a Hugging Face model folder")
    with open(path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path} is not valid JSON: {e}") from None
    return arch_from_dict(cfg)
