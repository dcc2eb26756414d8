"""Read and write Hugging Face safetensors checkpoints, one tensor at a time.

Reading is lazy (safetensors memory-maps; only the tensors asked for are materialised), so a rank that needs
one pipeline stage's layers never holds the whole model. Writing streams tensors into size-bounded shards and
writes `model.safetensors.index.json`, the layout `transformers` and vLLM load directly.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_rl.models.qwen_arch import QwenArch
from megatron_rl.models.weight_mapping import expected_hf_names, ignorable_hf_name

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """An HF checkpoint folder that does not match its config (missing/unexpected/truncated tensors)."""


class HFCheckpointReader:
    """Lazy access to the tensors of an HF folder (single file or sharded with an index)."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = os.fspath(hf_dir)
        self._handles: dict[str, object] = {}
        index_path = os.path.join(self.dir, INDEX_FILE)
        single_path = os.path.join(self.dir, SINGLE_FILE)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path} has no 'weight_map'")
            self._file_of = dict(weight_map)
        elif os.path.isfile(single_path):
            self._file_of = {}
            self._file_of = {name: SINGLE_FILE for name in self._handle(SINGLE_FILE).keys()}
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.dir}: not a safetensors HF checkpoint")
        missing_files = sorted({fn for fn in self._file_of.values() if not os.path.isfile(os.path.join(self.dir, fn))})
        if missing_files:
            raise CheckpointError(f"{self.dir}: shard file(s) listed in the index are missing: {missing_files}")

    def names(self) -> list[str]:
        return list(self._file_of)

    def _handle(self, filename: str):
        if filename not in self._handles:
            path = os.path.join(self.dir, filename)
            try:
                self._handles[filename] = safe_open(path, "pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
                raise CheckpointError(f"cannot open {path} (truncated or corrupt safetensors file?): {e}") from e
        return self._handles[filename]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise CheckpointError(f"tensor '{name}' is not in the checkpoint {self.dir}")
        try:
            return self._handle(self._file_of[name]).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read tensor '{name}' from {self.dir}: {e}") from e

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._file_of[name]).get_slice(name).get_shape())

    def validate(self, arch: QwenArch) -> None:
        """Every tensor the architecture needs is present with the right shape, and nothing unknown is present.

        Runs before any model is built, so a wrong or incomplete checkpoint fails in seconds.
        """
        present = set(self._file_of)
        expected = expected_hf_names(arch)
        missing = [n for n in expected if n not in present]
        if missing:
            raise CheckpointError(
                f"{self.dir} is missing {len(missing)} tensor(s) required by its config.json, e.g. {missing[:5]}"
            )
        unexpected = sorted(n for n in present - set(expected) if not ignorable_hf_name(n, arch))
        if unexpected:
            raise CheckpointError(
                f"{self.dir} has {len(unexpected)} tensor(s) its config.json does not explain, e.g. {unexpected[:5]}"
                " — is config.json from a different model?"
            )
        for name in expected:
            shape, want = self.shape(name), expected_hf_shape(name, arch)
            if shape != want:
                raise CheckpointError(f"{self.dir}: tensor '{name}' has shape {shape}, config.json implies {want}")

    def close(self):
        self._handles.clear()


def expected_hf_shape(name: str, arch: QwenArch) -> tuple[int, ...]:
    """Shape of an HF tensor implied by the architecture (used to catch config/weights mismatches)."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_kv_heads * d
    top = {"model.embed_tokens.weight": (arch.vocab_size, h), "lm_head.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if name in top:
        return top[name]
    match = re.match(r"^model\.layers\.\d+\.(.*)$", name)
    if not match:
        raise KeyError(name)
    rel = match.group(1)
    expert = re.match(r"^mlp\.experts\.\d+\.(.*)$", rel)
    ffn = arch.ffn_hidden_size
    if expert:
        rel, ffn = "mlp." + expert.group(1), arch.moe.expert_ffn_hidden_size
    shapes = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate.weight": (arch.moe.num_experts, h) if arch.moe else None,
        "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
    }
    if shapes.get(rel) is None:
        raise KeyError(name)
    return shapes[rel]


def write_hf_safetensors(
    out_dir: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    max_shard_bytes: int = 4 * 1024**3,
    metadata: dict[str, str] | None = None,
    progress=None,
) -> list[str]:
    """Stream (name, tensor) pairs into `model-0000K-of-0000N.safetensors` shards + index; return shard names.

    Holds at most one shard's tensors in memory. A single shard is written as `model.safetensors` (no index),
    matching what `save_pretrained` does for small models. `progress`, if given, is called with each name.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    temp_names: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0

    def flush():
        nonlocal shard, shard_bytes
        if not shard:
            return
        temp = f".partial-{len(temp_names):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, temp), metadata=meta)
        temp_names.append(temp)
        for n in shard:
            weight_map[n] = temp
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        if name in weight_map or name in shard:
            raise ValueError(f"tensor '{name}' written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor.detach().contiguous().cpu()
        shard_bytes += nbytes
        total += nbytes
        if progress is not None:
            progress(name)
    flush()

    if len(temp_names) == 1:
        final = {temp_names[0]: SINGLE_FILE}
    else:
        n = len(temp_names)
        final = {t: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, t in enumerate(temp_names)}
    for temp, name in final.items():
        os.replace(os.path.join(out_dir, temp), os.path.join(out_dir, name))
    index_path = os.path.join(out_dir, INDEX_FILE)
    if len(temp_names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
        with open(index_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        os.replace(index_path + ".tmp", index_path)
    elif os.path.exists(index_path):
        os.remove(index_path)
    return sorted(final.values())


def iter_checkpoint(reader: HFCheckpointReader, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        yield name, reader.get(name)
