#!/usr/bin/env python
"""Write a tiny random-init Qwen checkpoint + offline tokenizer (for tests and the CPU quickstart).

Examples:
  python tools/make_tiny_model.py --arch qwen3 --out /tmp/tiny_qwen3
  python tools/make_tiny_model.py --arch qwen3_moe --out /tmp/tiny_moe --layers 4 --experts 8
  python tools/make_tiny_model.py --arch qwen3_moe --out /tmp/tiny_mixed --mlp-only-layers 0 --no-norm-topk-prob
  python tools/make_tiny_model.py --arch qwen2 --out /tmp/tiny_qwen2 --hidden-size 128 --tie-embeddings

The folder holds config.json, model.safetensors (fp32), an offline byte-level BPE tokenizer with a ChatML chat
template, and generation_config.json; `transformers`, vLLM and `megatron-rl verify-model --hf` load it directly.
"""
import argparse
import dataclasses
import sys

from megatron_rl.models.qwen_arch import ModelConfigError
from megatron_rl.models.tiny import ARCHS, TinySize, make_tiny_model

MOE_ONLY = ("experts", "top_k", "expert_ffn", "mlp_only_layers", "no_norm_topk_prob")


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 0,2, got {text!r}") from None


def main(argv=None) -> int:
    d = TinySize()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, choices=ARCHS,
                   help="qwen2 (Qwen2/2.5: qkv bias), qwen3 (qk-norm), qwen3_moe (qk-norm + routed experts)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--seed", type=int, default=0, help="init seed; the same seed writes the same weights")
    p.add_argument("--hidden-size", type=int, default=d.hidden_size, help=f"default {d.hidden_size}")
    p.add_argument("--layers", type=int, default=d.num_layers, help=f"decoder layers (default {d.num_layers})")
    p.add_argument("--heads", type=int, default=d.num_attention_heads,
                   help=f"attention heads (default {d.num_attention_heads})")
    p.add_argument("--kv-heads", type=int, default=d.num_kv_heads,
                   help=f"key/value heads, a divisor of --heads (default {d.num_kv_heads})")
    p.add_argument("--head-dim", type=int, default=None,
                   help=f"qwen3/qwen3_moe only (default {d.head_dim}); qwen2's is hidden-size / heads")
    p.add_argument("--ffn", type=int, default=d.intermediate_size,
                   help=f"dense MLP intermediate size (default {d.intermediate_size})")
    p.add_argument("--experts", type=int, default=None, help=f"qwen3_moe: number of experts (default {d.num_experts})")
    p.add_argument("--top-k", type=int, default=None, help=f"qwen3_moe: experts per token (default {d.top_k})")
    p.add_argument("--expert-ffn", type=int, default=None,
                   help=f"qwen3_moe: expert intermediate size (default {d.moe_intermediate_size})")
    p.add_argument("--mlp-only-layers", type=_layer_list, default=None, metavar="I,J",
                   help="qwen3_moe: layers with a dense MLP instead of experts (default: none)")
    p.add_argument("--no-norm-topk-prob", action="store_true",
                   help="qwen3_moe: do not renormalise the top-k router probabilities (default: renormalise, "
                   "as Qwen3-30B-A3B)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help=f"at least the tokenizer's size; divisible by the TP sizes you test (default {d.vocab_size})")
    p.add_argument("--tie-embeddings", action="store_true", help="share the input embedding and the output head")
    p.add_argument("--init-std", type=float, default=d.initializer_range,
                   help=f"weight init std (default {d.initializer_range}, Qwen's; tests use 0.2 for O(1) logits)")
    a = p.parse_args(argv)
    if a.arch != "qwen3_moe":
        given = [f"--{name.replace('_', '-')}" for name in MOE_ONLY if getattr(a, name) not in (None, False)]
        if given:
            p.error(f"{', '.join(given)} only apply to --arch qwen3_moe, not {a.arch}")
    if a.arch == "qwen2" and a.head_dim is not None:
        p.error("--head-dim does not apply to --arch qwen2: its head dim is --hidden-size / --heads")
    def given(value, default):
        return default if value is None else value

    try:
        size = dataclasses.replace(
            d, hidden_size=a.hidden_size, num_layers=a.layers, num_attention_heads=a.heads, num_kv_heads=a.kv_heads,
            head_dim=given(a.head_dim, d.head_dim), intermediate_size=a.ffn, num_experts=given(a.experts, d.num_experts),
            top_k=given(a.top_k, d.top_k), moe_intermediate_size=given(a.expert_ffn, d.moe_intermediate_size),
            mlp_only_layers=given(a.mlp_only_layers, ()), norm_topk_prob=not a.no_norm_topk_prob,
            vocab_size=a.vocab_size, tie_word_embeddings=a.tie_embeddings, initializer_range=a.init_std,
        )
        out = make_tiny_model(a.arch, a.out, size=size, seed=a.seed)
    except (ModelConfigError, ValueError) as e:
        p.error(str(e))
    print(f"wrote {a.arch} tiny model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
