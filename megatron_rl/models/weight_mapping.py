"""Names and layouts of Qwen weights in Hugging Face and in Megatron-Core, and the exact conversions between them.

Three name spaces:
- HF names, as in the safetensors files of released checkpoints (`model.layers.3.self_attn.q_proj.weight`,
  `model.layers.3.mlp.experts.17.gate_proj.weight`, ...).
- Canonical Megatron names: the full, unsharded model in local-spec naming with *global* layer and expert
  indices (`decoder.layers.3.mlp.experts.local_experts.17.linear_fc1.weight`). Independent of TP/PP/EP/VPP.
- Local Megatron names: what `named_parameters()` of one rank's model chunk returns (local layer index inside
  the pipeline stage, local expert index inside the EP rank, TE fused-norm naming on GPU).
  `canonical_name()` maps local -> canonical.

Tensor layouts that differ (everything else is a plain copy):
- qkv: Megatron's `linear_qkv` stacks, for each KV group g, [the group's query heads; k_g; v_g] along dim 0
  (megatron/core/transformer/attention.py, SelfAttention.get_query_key_value_tensors). HF keeps q, k, v apart.
- glu: Megatron's `linear_fc1` is [gate; up] along dim 0 (megatron/core/transformer/mlp.py, `glu`), HF keeps
  gate_proj and up_proj apart. Under TP each rank holds [gate_r; up_r], not a contiguous slice of [gate; up].
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from megatron_rl.models.qwen_arch import QwenArch

COPY, QKV, GLU = "copy", "qkv", "glu"


@dataclass(frozen=True)
class TensorMapping:
    """One canonical Megatron tensor and the HF tensor(s) it is made of."""

    megatron_name: str
    hf_names: tuple[str, ...]
    kind: str = COPY  # COPY: 1 HF tensor; QKV: (q, k, v); GLU: (gate, up)


def _layer_mappings(arch: QwenArch, layer: int) -> list[TensorMapping]:
    m, h = f"decoder.layers.{layer}.", f"model.layers.{layer}."
    out = [
        TensorMapping(m + "input_layernorm.weight", (h + "input_layernorm.weight",)),
        TensorMapping(
            m + "self_attention.linear_qkv.weight",
            tuple(h + f"self_attn.{p}_proj.weight" for p in "qkv"),
            QKV,
        ),
    ]
    if arch.qkv_bias:
        out.append(
            TensorMapping(m + "self_attention.linear_qkv.bias", tuple(h + f"self_attn.{p}_proj.bias" for p in "qkv"), QKV)
        )
    if arch.qk_norm:
        out += [
            TensorMapping(m + "self_attention.q_layernorm.weight", (h + "self_attn.q_norm.weight",)),
            TensorMapping(m + "self_attention.k_layernorm.weight", (h + "self_attn.k_norm.weight",)),
        ]
    out += [
        TensorMapping(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",)),
        TensorMapping(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",)),
    ]
    if arch.moe is not None and arch.moe.moe_layers[layer]:
        out.append(TensorMapping(m + "mlp.router.weight", (h + "mlp.gate.weight",)))
        for e in range(arch.moe.num_experts):
            me, he = m + f"mlp.experts.local_experts.{e}.", h + f"mlp.experts.{e}."
            out += [
                TensorMapping(me + "linear_fc1.weight", (he + "gate_proj.weight", he + "up_proj.weight"), GLU),
                TensorMapping(me + "linear_fc2.weight", (he + "down_proj.weight",)),
            ]
    else:
        out += [
            TensorMapping(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), GLU),
            TensorMapping(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",)),
        ]
    return out


def all_mappings(arch: QwenArch) -> list[TensorMapping]:
    """Every tensor of the full model, in a fixed order (embedding, layers, final norm, output layer)."""
    out = [TensorMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",))]
    for layer in range(arch.num_layers):
        out += _layer_mappings(arch, layer)
    out.append(TensorMapping("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not arch.tie_word_embeddings:
        out.append(TensorMapping("output_layer.weight", ("lm_head.weight",)))
    return out


def mappings_by_megatron_name(arch: QwenArch) -> dict[str, TensorMapping]:
    return {m.megatron_name: m for m in all_mappings(arch)}


def expected_hf_names(arch: QwenArch) -> list[str]:
    return [name for m in all_mappings(arch) for name in m.hf_names]


# HF tensors a checkpoint may carry that we deliberately do not load (documented, never silent).
IGNORABLE_HF_PATTERNS = (
    re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),  # recomputed from rope_theta
)


def ignorable_hf_name(name: str, arch: QwenArch) -> bool:
    if arch.tie_word_embeddings and name == "lm_head.weight":
        return True  # some tied checkpoints still store the (identical) head; the embedding is the source
    return any(p.match(name) for p in IGNORABLE_HF_PATTERNS)


# ------------------------------------------------------------------------------------------------------------
# Tensor conversions
# ------------------------------------------------------------------------------------------------------------
def _qkv_group_shapes(arch: QwenArch):
    groups = arch.num_kv_heads
    return groups, arch.num_attention_heads // groups, arch.head_dim


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: QwenArch) -> torch.Tensor:
    """HF q [heads*d, ...], k/v [groups*d, ...] -> Megatron [groups*(heads/groups + 2)*d, ...] interleaved."""
    groups, per_group, d = _qkv_group_shapes(arch)
    rest = q.shape[1:]
    q = q.reshape(groups, per_group * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per_group + 2) * d, *rest)


def split_qkv(qkv: torch.Tensor, arch: QwenArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of merge_qkv."""
    groups, per_group, d = _qkv_group_shapes(arch)
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return (
        q.reshape(groups * per_group * d, *rest).contiguous(),
        k.reshape(groups * d, *rest).contiguous(),
        v.reshape(groups * d, *rest).contiguous(),
    )


def hf_to_megatron(mapping: TensorMapping, hf_tensors: list[torch.Tensor], arch: QwenArch) -> torch.Tensor:
    """Build the full (unsharded) Megatron tensor from its HF tensors."""
    if mapping.kind == QKV:
        return merge_qkv(*hf_tensors, arch)
    if mapping.kind == GLU:
        return torch.cat(hf_tensors, dim=0)
    (only,) = hf_tensors
    return only


def megatron_to_hf(mapping: TensorMapping, tensor: torch.Tensor, arch: QwenArch) -> list[tuple[str, torch.Tensor]]:
    """Split a full Megatron tensor into its HF-named tensors."""
    if mapping.kind == QKV:
        parts = split_qkv(tensor, arch)
    elif mapping.kind == GLU:
        parts = tuple(t.contiguous() for t in torch.chunk(tensor, 2, dim=0))
    else:
        parts = (tensor,)
    return list(zip(mapping.hf_names, parts))


# ------------------------------------------------------------------------------------------------------------
# Local (per-rank) Megatron names -> canonical names, and how a parameter is sharded
# ------------------------------------------------------------------------------------------------------------
_TE_ALIASES = (
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
    (re.compile(r"mlp\.experts\.linear_fc(\d)\.weight(\d+)$"), r"mlp.experts.local_experts.\2.linear_fc\1.weight"),
)
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")


def canonical_name(local_name: str, layer_offset_of: dict[int, int], expert_offset: int) -> str:
    """Map one local parameter name to its canonical name.

    layer_offset_of: local layer index -> global layer index for this model chunk;
    expert_offset: global index of this rank's first local expert (ep_rank * experts_per_rank).
    """
    name = local_name
    layer = _LAYER.match(name)
    if not layer:
        return name
    local_layer, rest = int(layer.group(1)), layer.group(2)
    for pattern, replacement in _TE_ALIASES:
        rest = pattern.sub(replacement, rest)
    expert = _EXPERT.match(rest)
    if expert:
        rest = f"mlp.experts.local_experts.{int(expert.group(1)) + expert_offset}.{expert.group(2)}"
    return f"decoder.layers.{layer_offset_of[local_layer]}.{rest}"


def is_expert_param(canonical: str) -> bool:
    return ".mlp.experts." in canonical


def is_glu_param(canonical: str) -> bool:
    return canonical.endswith("linear_fc1.weight")


def tp_partition_dim(param: torch.nn.Parameter) -> int | None:
    """The dim along which (expert-)tensor parallelism splits this parameter, or None when replicated."""
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim)
    return None


def shard_for_rank(full: torch.Tensor, dim: int | None, glu: bool, rank: int, size: int) -> torch.Tensor:
    """The slice of a full Megatron tensor that (expert-)TP rank `rank` of `size` holds."""
    if dim is None or size == 1:
        return full
    if glu:  # each rank holds [gate_r; up_r]
        gate, up = torch.chunk(full, 2, dim=dim)
        return torch.cat([torch.chunk(gate, size, dim=dim)[rank], torch.chunk(up, size, dim=dim)[rank]], dim=dim)
    if full.shape[dim] % size:
        raise ValueError(f"cannot split dim {dim} of size {full.shape[dim]} across {size} tensor-parallel ranks")
    return torch.chunk(full, size, dim=dim)[rank]


def unshard(parts: list[torch.Tensor], dim: int | None, glu: bool) -> torch.Tensor:
    """Inverse of shard_for_rank given every rank's slice in rank order."""
    if dim is None or len(parts) == 1:
        return parts[0]
    if glu:
        halves = [torch.chunk(p, 2, dim=dim) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves], dim=dim), torch.cat([h[1] for h in halves], dim=dim)], dim=dim)
    return torch.cat(parts, dim=dim)
