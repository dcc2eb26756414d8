#!/usr/bin/env python
"""Write a tiny random-init Qwen checkpoint + offline tokenizer (for tests and the CPU quickstart).

Examples:
  python tools/make_tiny_model.py --arch qwen3 --out /tmp/tiny_qwen3
  python tools/make_tiny_model.py --arch qwen3_moe --out /tmp/tiny_moe --layers 4 --experts 8
  python tools/make_tiny_model.py --arch qwen2 --out /tmp/tiny_qwen2 --hidden-size 128 --tie-embeddings
"""
import argparse
import dataclasses
import sys

from megatron_rl.models.tiny import ARCHS, TinySize, make_tiny_model


def main(argv=None) -> int:
    d = TinySize()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, choices=ARCHS)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden-size", type=int, default=d.hidden_size)
    p.add_argument("--layers", type=int, default=d.num_layers)
    p.add_argument("--heads", type=int, default=d.num_attention_heads)
    p.add_argument("--kv-heads", type=int, default=d.num_kv_heads)
    p.add_argument("--head-dim", type=int, default=d.head_dim, help="qwen3/qwen3_moe only (qwen2: hidden/heads)")
    p.add_argument("--ffn", type=int, default=d.intermediate_size, help="dense MLP intermediate size")
    p.add_argument("--experts", type=int, default=d.num_experts)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--expert-ffn", type=int, default=d.moe_intermediate_size)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--tie-embeddings", action="store_true")
    p.add_argument("--init-std", type=float, default=d.initializer_range, help="weight init std (Qwen: 0.02)")
    a = p.parse_args(argv)
    size = dataclasses.replace(
        d, hidden_size=a.hidden_size, num_layers=a.layers, num_attention_heads=a.heads, num_kv_heads=a.kv_heads,
        head_dim=a.head_dim, intermediate_size=a.ffn, num_experts=a.experts, top_k=a.top_k,
        moe_intermediate_size=a.expert_ffn, vocab_size=a.vocab_size, tie_word_embeddings=a.tie_embeddings,
        initializer_range=a.init_std,
    )
    out = make_tiny_model(a.arch, a.out, size=size, seed=a.seed)
    print(f"wrote {a.arch} tiny model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
