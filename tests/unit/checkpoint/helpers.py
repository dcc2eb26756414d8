"""Test helpers: small PyTorch-DCP folders written in one process, laid out like Megatron's torch_dist checkpoints,
and an exact comparison of two HF folders.

The key layout is built here independently of megatron_rl.checkpoint.sharded_keys, from the Megatron-Core 0.16.1
sources (transformer_block.py, mlp.py, moe/experts.py): fused-norm names, per-layer or layer-stacked keys and
expert-stacked `mlp.experts.experts.linear_fc{1,2}.weight`. The real Megatron output is covered by
tests/integration/test_convert.py.
"""
import json
import os
import re
import warnings

import torch

from megatron_rl.models.hf_io import HFCheckpointReader
from megatron_rl.models.qwen_arch import load_arch
from megatron_rl.models.weight_mapping import all_mappings, hf_to_megatron

FUSED_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def write_dcp(path: str, tensors: dict[str, torch.Tensor], backend: str = "torch_dist") -> None:
    """A single-process DCP save of plain tensors, plus Megatron's metadata.json."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    os.makedirs(path, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save(dict(tensors), storage_writer=FileSystemWriter(path), no_dist=True)
    with open(os.path.join(path, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": backend, "sharded_backend_version": 1, "common_backend": "torch",
                   "common_backend_version": 1}, f)


def megatron_key_tensors(hf_dir: str, stack_layers: bool = False) -> dict[str, torch.Tensor]:
    """The full tensors of an HF folder under Megatron dist-checkpoint keys."""
    arch = load_arch(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for m in all_mappings(arch):
        tensor = hf_to_megatron(m, [reader.get(n) for n in m.hf_names], arch)
        layer = re.match(r"^(decoder\.layers\.\d+\.)(.*)$", m.megatron_name)
        if not layer:
            out[m.megatron_name] = tensor
            continue
        prefix, rest = layer.groups()
        rest = FUSED_NORMS.get(rest, rest)
        expert = re.match(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$", rest)
        if expert:
            experts.setdefault(f"{prefix}mlp.experts.experts.{expert.group(2)}", {})[int(expert.group(1))] = tensor
        else:
            out[prefix + rest] = tensor
    for key, by_index in experts.items():
        out[key] = torch.stack([by_index[e] for e in sorted(by_index)])
    if stack_layers:
        stacked: dict[str, dict[int, torch.Tensor]] = {}
        for key in [k for k in out if k.startswith("decoder.layers.")]:
            layer, rest = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", key).groups()
            stacked.setdefault(f"decoder.layers.{rest}", {})[int(layer)] = out.pop(key)
        for key, by_layer in stacked.items():
            out[key] = torch.stack([by_layer[i] for i in sorted(by_layer)])
    return out


def assert_same_tensors(a_dir, b_dir, dtype=None):
    """Both HF folders hold the same tensor names, and every tensor of b equals a's (cast to `dtype`) bit for bit."""
    a, b = HFCheckpointReader(a_dir), HFCheckpointReader(b_dir)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        want = a.get(name) if dtype is None else a.get(name).to(dtype)
        got = b.get(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
