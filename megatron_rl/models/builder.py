"""Build Megatron GPTModel chunks for a Qwen architecture: TransformerConfig, layer spec, model.

The mapping from HF Qwen to Megatron-Core (what makes logits equal, see tests/distributed/test_model_parity.py):
- RMSNorm everywhere with `rms_norm_eps`; SwiGLU MLPs (gated_linear_unit + silu), no linear biases;
- Qwen2: `add_qkv_bias`; Qwen3: `qk_layernorm` (per-head RMSNorm on q and k, applied before RoPE in both);
- RoPE with base `rope_theta`, non-interleaved (HF rotate_half == Megatron's default);
- GQA: num_query_groups = num_key_value_heads, kv_channels = head_dim;
- Qwen3-MoE router: HF takes softmax over all experts, top-k, then renormalises iff `norm_topk_prob`.
  Megatron with `moe_router_pre_softmax=False` takes top-k of the logits and a softmax over those k, which is
  the same distribution as softmax-then-renormalise; without `norm_topk_prob` we use pre-softmax (no
  renormalisation). Dense layers of a MoE model (`mlp_only_layers`) go through `moe_layer_freq`.
- Tied embeddings: `share_embeddings_and_output_weights`.

The layer spec is Megatron's local spec on CPU (or whenever Transformer Engine is not importable) and the
Transformer-Engine spec otherwise. Core attention is `megatron_rl.parallel.torch_attention.TorchCoreAttention`
(SDPA) wherever the spec's own cannot run our batches (`uses_torch_core_attention`): the local spec's refuses packed
sequences and context parallelism, and TE's has no fp32 kernel for packed (THD) sequences (its flash and fused
backends take fp16/bf16 only, and it turns its unfused backend off for THD).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F

from megatron_rl.models.qwen_arch import QwenArch
from megatron_rl.parallel.cpu_compat import apply_cpu_compat
from megatron_rl.parallel.layout import ParallelLayout
from megatron_rl.parallel.thd_rope import use_packed_rope_positions


def transformer_engine_available() -> bool:
    """True when TE imports and CUDA is usable (the TE spec is only meaningful on GPU)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no TE"
        return False
    return True


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def transformer_config(
    arch: QwenArch,
    layout: ParallelLayout,
    *,
    dtype: str = "float32",
    moe_aux_loss_coeff: float = 0.0,
    recompute: bool = False,
    **overrides,
):
    """The Megatron TransformerConfig equivalent of `arch` under `layout`.

    dtype: parameter/compute dtype, "float32" or "bfloat16" (bf16 keeps fp32 main params in the optimizer).
    moe_aux_loss_coeff: load-balancing loss coefficient for MoE training (0 disables it; RL recipes for
    Qwen3-MoE commonly use 0 or 1e-3).
    overrides: any further TransformerConfig field, applied last.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    params_dtype = DTYPES[dtype]
    on_gpu = torch.cuda.is_available()
    fields = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # fusions are CUDA kernels; on CPU every one must be off
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not on_gpu,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=False,
        **layout.megatron_sizes(),
        sequence_parallel=layout.use_sequence_parallel,
        variable_seq_lengths=True,  # RL batches change length every step
        moe_token_dispatcher_type="alltoall",  # checked even for dense models: allgather refuses variable lengths
        deallocate_pipeline_outputs=True,
    )
    if recompute:
        fields.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if arch.moe is not None:
        moe = arch.moe
        fields.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.top_k,
            moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
            moe_router_pre_softmax=not moe.norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_dtype="fp32",
            moe_grouped_gemm=transformer_engine_available(),
            moe_permute_fusion=False,
            moe_router_load_balancing_type="aux_loss" if moe_aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=moe_aux_loss_coeff,
            moe_layer_freq=[int(x) for x in moe.moe_layers],
        )
    fields.update(overrides)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TransformerConfig)}
    if unknown:
        raise ValueError(f"unknown TransformerConfig override(s): {sorted(unknown)}")
    return TransformerConfig(**fields)


def uses_torch_core_attention(use_transformer_engine: bool, params_dtype: torch.dtype) -> bool:
    """Whether core attention is our SDPA module rather than the spec's: always without TE (module docstring), and
    with TE unless the model computes in fp16/bf16 (TE's attention has no fp32 path for packed sequences, and one
    attention for packed and padded batches keeps their results equal)."""
    return not use_transformer_engine or params_dtype not in (torch.bfloat16, torch.float16)


def block_spec(config, *, use_transformer_engine: bool | None = None, vp_stage: int | None = None):
    """The decoder block spec for this pipeline stage (handles dense/MoE layer patterns)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    use_te = transformer_engine_available() if use_transformer_engine is None else use_transformer_engine
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage)
    if uses_torch_core_attention(use_te, config.params_dtype):
        from megatron_rl.parallel.torch_attention import TorchCoreAttention

        spec = copy.deepcopy(spec)
        for layer_spec in spec.layer_specs:
            layer_spec.submodules.self_attention.submodules.core_attention = TorchCoreAttention
    return spec


def build_model_chunks(arch: QwenArch, config, *, use_transformer_engine: bool | None = None) -> list:
    """Build this rank's GPTModel chunk(s) (one per virtual pipeline stage) with Megatron's process groups live."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    apply_cpu_compat()
    use_packed_rope_positions()  # THD RoPE without a per-sequence loop (parallel/thd_rope.py), same numbers
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
    chunks = []
    for vp_stage in range(vpp):
        vp = vp_stage if vpp > 1 else None
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp)
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
        model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(config, use_transformer_engine=use_transformer_engine, vp_stage=vp),
            vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=arch.rope_theta,
            vp_stage=vp,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
