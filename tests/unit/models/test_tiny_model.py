"""tools/make_tiny_model.py: a loadable random checkpoint, an offline tokenizer with Qwen's ChatML template,
deterministic weights, and refusal (before writing anything) of options that do not apply or cannot load."""
import importlib.util
import os

import pytest
import torch
from safetensors.torch import load_file

from megatron_rl.models.hf_io import HFCheckpointReader
from megatron_rl.models.qwen_arch import load_arch
from megatron_rl.models.tiny import TinySize, make_tiny_model

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools", "make_tiny_model.py")


def _tool():
    spec = importlib.util.spec_from_file_location("make_tiny_model_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_writes_a_mixed_moe_model_that_validates(tmp_path, capsys):
    out = tmp_path / "moe"
    argv = ["--arch", "qwen3_moe", "--out", str(out), "--layers", "3", "--mlp-only-layers", "1", "--no-norm-topk-prob"]
    assert _tool().main(argv) == 0
    assert "wrote qwen3_moe" in capsys.readouterr().out
    arch = load_arch(out)
    assert arch.moe.moe_layers == (True, False, True) and arch.moe.norm_topk_prob is False
    HFCheckpointReader(out).validate(arch)  # every tensor the config implies, with its shape, nothing else

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)  # offline: from the folder alone
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert len(tok) <= arch.vocab_size
    text = "Answer: \\boxed{42} — naïve 😀"  # byte-level BPE: any text round-trips
    assert tok.decode(tok(text)["input_ids"]) == text


def test_same_seed_same_weights(tmp_path):
    size = TinySize(num_layers=1)
    a = load_file(os.path.join(make_tiny_model("qwen2", tmp_path / "a", size=size, seed=3), "model.safetensors"))
    b = load_file(os.path.join(make_tiny_model("qwen2", tmp_path / "b", size=size, seed=3), "model.safetensors"))
    c = load_file(os.path.join(make_tiny_model("qwen2", tmp_path / "c", size=size, seed=4), "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arch", "qwen3", "--experts", "8"], "--experts only apply to --arch qwen3_moe"),
        (["--arch", "qwen2", "--no-norm-topk-prob"], "--no-norm-topk-prob only apply to --arch qwen3_moe"),
        (["--arch", "qwen2", "--head-dim", "64"], "--head-dim does not apply to --arch qwen2"),
        (["--arch", "qwen3", "--kv-heads", "3"], "num_key_value_heads"),
        (["--arch", "qwen3_moe", "--top-k", "9"], "num_experts_per_tok"),
        (["--arch", "qwen3_moe", "--mlp-only-layers", "5"], "mlp_only_layers"),
        (["--arch", "qwen3", "--vocab-size", "100"], "smaller than the tokenizer"),
        (["--arch", "qwen3", "--mlp-only-layers", "a"], "comma-separated layer indices"),
    ],
)
def test_bad_options_are_refused_before_writing(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        _tool().main([*argv, "--out", str(out)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
