"""Keys of a Megatron-Core 0.16.1 distributed checkpoint -> canonical Megatron names (see models/weight_mapping.py).

A checkpoint key is the *global* name Megatron gives a tensor in `sharded_state_dict()`, not the module path.
The layouts this module reads (megatron/core/transformer/{transformer_block,mlp,moe/experts}.py):

- Per-layer keys `decoder.layers.<L>.<rest>` (layers "non-homogeneous": what `save_model_checkpoint` writes,
  and what Megatron always writes for MoE models with a per-layer `moe_layer_freq`), or layer-stacked keys
  `decoder.layers.<rest>` whose tensors carry a prepended layer axis of size num_layers (homogeneous layers, the
  Megatron default for dense models).
- Fused-norm names, used by both the TE and the local layer spec: `self_attention.linear_qkv.layer_norm_weight`
  is the input RMSNorm, `mlp.linear_fc1.layer_norm_weight` the pre-MLP RMSNorm.
- Experts: `mlp.experts.experts.linear_fc{1,2}.weight` with a prepended expert axis (SequentialMLP and
  TEGroupedMLP write the same keys), or, with `singleton_local_shards`, one key per expert
  `mlp.experts.experts.<E>.linear_fc{1,2}.weight`.
- SwiGLU fc1: saved in two halves (gate, then up) of one global tensor `[gate_full; up_full]` (each TP rank's
  `[gate_r; up_r]` is split by `apply_swiglu_sharded_factory`), which is exactly the canonical fc1 layout; with
  `singleton_local_shards` the halves are separate keys `..._w` (gate) and `..._v` (up).
- `_extra_state` entries are byte objects (Transformer Engine FP8 metadata), not weights.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_rl.checkpoint.dcp_reader import DistCheckpointError, TensorInfo

# checkpoint sub-key (inside a layer) -> canonical sub-key
_FUSED_NORM_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER_KEY = re.compile(r"^decoder\.layers\.(?:(\d+)\.)?(.+)$")
_EXPERT_KEY = re.compile(r"^mlp\.experts\.experts\.(?:(\d+)\.)?(linear_fc[12]\.(?:weight|bias))(_w|_v)?$")
_GLU_HALF_KEY = re.compile(r"^(.+\.linear_fc1\.(?:weight|bias))(_w|_v)$")
_HALF_ORDER = {"_w": 0, "_v": 1}  # w = gate, v = up: canonical fc1 is [gate; up]


@dataclass(frozen=True)
class TensorSource:
    """Where a tensor lives in the checkpoint: `key`, restricted to leading (stacked-axis) indices `index`."""

    key: str
    index: tuple[int, ...] = ()


@dataclass(frozen=True)
class CanonicalSource:
    """A canonical Megatron tensor: its parts, concatenated along dim 0 when there are two (GLU halves)."""

    canonical: str
    parts: tuple[TensorSource, ...]
    shape: tuple[int, ...]


def _expand(key: str, info: TensorInfo) -> list[tuple[str, tuple[int, ...], int | None]]:
    """(canonical name, leading indices, GLU half) for every canonical tensor stored under `key`."""
    layer = _LAYER_KEY.match(key)
    if not layer:
        return [(key, (), None)]
    layer_idx, rest = layer.group(1), layer.group(2)
    layers = [((), int(layer_idx))] if layer_idx is not None else [((i,), i) for i in range(info.shape[0])]
    out = []
    expert = _EXPERT_KEY.match(rest)
    for lead, li in layers:
        if expert:
            e_idx, leaf, half = expert.group(1), expert.group(2), expert.group(3)
            axis = len(lead)
            experts = [((), int(e_idx))] if e_idx is not None else [((e,), e) for e in range(info.shape[axis])]
            for e_lead, e in experts:
                out.append((f"decoder.layers.{li}.mlp.experts.local_experts.{e}.{leaf}", lead + e_lead,
                            _HALF_ORDER.get(half)))
            continue
        half = None
        glu = _GLU_HALF_KEY.match(rest)
        sub = rest
        if glu:
            sub, half = glu.group(1), _HALF_ORDER[glu.group(2)]
        sub = _FUSED_NORM_ALIASES.get(sub, sub)
        out.append((f"decoder.layers.{li}.{sub}", lead, half))
    return out


def canonical_sources(tensors: dict[str, TensorInfo]) -> dict[str, CanonicalSource]:
    """Map every tensor of a checkpoint (`DistCheckpointReader.tensors()`) to canonical Megatron names."""
    halves: dict[str, dict[int | None, tuple[TensorSource, tuple[int, ...]]]] = {}
    for key, info in tensors.items():
        for canonical, lead, half in _expand(key, info):
            slot = halves.setdefault(canonical, {})
            if half in slot or (half is None and slot) or (half is not None and None in slot):
                raise DistCheckpointError(f"checkpoint stores '{canonical}' twice (key '{key}' and another)")
            slot[half] = (TensorSource(key, lead), tuple(info.shape[len(lead):]))
    out = {}
    for canonical, slot in halves.items():
        if None in slot:
            source, shape = slot[None]
            out[canonical] = CanonicalSource(canonical, (source,), shape)
            continue
        if set(slot) != {0, 1}:
            raise DistCheckpointError(f"checkpoint has only one SwiGLU half (_w/_v) of '{canonical}'")
        (w, w_shape), (v, v_shape) = slot[0], slot[1]
        if w_shape != v_shape:
            raise DistCheckpointError(f"SwiGLU halves of '{canonical}' differ in shape: {w_shape} vs {v_shape}")
        out[canonical] = CanonicalSource(canonical, (w, v), (w_shape[0] * 2,) + w_shape[1:])
    return out
