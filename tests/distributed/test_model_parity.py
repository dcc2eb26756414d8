"""Megatron logits == transformers logits for Qwen2, Qwen3 and Qwen3-MoE in several parallel layouts, and
export(import(hf)) == hf bit for bit.

Tolerance 1e-4 absolute on logits of magnitude ~5 (fp32): the two implementations sum in different orders
(fused qkv, TP partial sums, expert permutation), which costs ~1e-6 here; any mapping error (a wrong head order,
a swapped gate/up, an unnormalised router) moves logits by >1e-2 at this init scale.
"""
import pytest

from megatron_rl.models import verify
from megatron_rl.models.hf_io import CheckpointError
from megatron_rl.models.qwen_arch import ModelConfigError
from megatron_rl.models.verify import minimal_world_size
from megatron_rl.parallel.layout import ParallelLayout, ParallelLayoutError

pytestmark = pytest.mark.distributed

CASES = [
    ("qwen2", ParallelLayout(), {"tie_word_embeddings": True}),
    ("qwen3", ParallelLayout(), {}),
    ("qwen3_moe", ParallelLayout(), {}),
    ("qwen2", ParallelLayout(tp=2), {}),
    ("qwen3", ParallelLayout(pp=2), {}),
    ("qwen3_moe", ParallelLayout(ep=2), {}),
    ("qwen3_moe", ParallelLayout(tp=2, ep=2), {}),
    # router without renormalisation (moe_router_pre_softmax) and a dense layer inside a MoE model (moe_layer_freq)
    ("qwen3_moe", ParallelLayout(ep=2), {"norm_topk_prob": False, "mlp_only_layers": (0,)}),
]
SLOW_CASES = [  # completes the matrix: every architecture at TP=2 and PP=2, and deeper products
    ("qwen3", ParallelLayout(tp=2), {}),
    ("qwen2", ParallelLayout(pp=2), {}),
    ("qwen3_moe", ParallelLayout(pp=2), {}),
    ("qwen2", ParallelLayout(pp=2, vpp=2), {"num_layers": 4, "tie_word_embeddings": True}),
    ("qwen3", ParallelLayout(tp=2, pp=2), {}),
    ("qwen3_moe", ParallelLayout(tp=2, pp=2, ep=2), {"num_layers": 4}),
    ("qwen3_moe", ParallelLayout(ep=2, etp=2), {}),
]


def case_id(case) -> str:
    arch, layout, size = case
    sizes = [f"{k}={v}" for k, v in size.items()]
    return "-".join([arch, layout.describe(minimal_world_size(layout)).replace(" ", ""), *sizes])


def _check(tiny_model, arch, layout, size):
    report = verify.verify_model(tiny_model(arch, **size), layout, tolerance=1e-4)
    assert report.max_abs_logit > 1.0, "logits too small for the comparison to mean anything"
    assert report.max_abs_diff <= 1e-4, report
    assert report.export_bitexact is True, report


@pytest.mark.parametrize("arch, layout, size", CASES, ids=[case_id(c) for c in CASES])
def test_logits_match_transformers(tiny_model, arch, layout, size):
    _check(tiny_model, arch, layout, size)


@pytest.mark.slow
@pytest.mark.parametrize("arch, layout, size", SLOW_CASES, ids=[case_id(c) for c in SLOW_CASES])
def test_logits_match_transformers_more_layouts(tiny_model, arch, layout, size):
    _check(tiny_model, arch, layout, size)


def _without_tokenizer(tiny_model, tmp_path):
    import os
    import shutil

    path = shutil.copytree(tiny_model("qwen3"), tmp_path / "weights_only")
    for name in os.listdir(path):
        if name.startswith("tokenizer"):
            os.remove(path / name)
    return str(path)


def test_cli_fails_above_tolerance_and_runs_without_a_tokenizer(tiny_model, tmp_path, capsys):
    """Exit 1 when max |dlogit| exceeds --tolerance: at TP=2 the row-parallel partial sums change the float
    summation order (~1e-7 differences; at TP=1 this tiny model matches bit for bit), so a 1e-12 tolerance makes
    the real comparison fail. A folder with weights and config only is checked on fixed token ids, and says so."""
    from megatron_rl.cli import main

    argv = ["verify-model", "--hf", _without_tokenizer(tiny_model, tmp_path), "--tp", "2", "--tolerance", "1e-12"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "fixed token ids" in out and "bit-exact" in out
@pytest.fixture
def no_spawn(monkeypatch):
    """Bad input must be refused before any rank is spawned, model built or weight loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("ranks were spawned for an input that should have been refused up front")

    monkeypatch.setattr("megatron_rl.parallel.spawn.spawn_ranks", refuse)


def test_unsupported_model_type_refused_up_front(tiny_model, tmp_path, no_spawn):
    import json
    import shutil

    path = shutil.copytree(tiny_model("qwen3"), tmp_path / "m")
    cfg = json.load(open(path / "config.json"))
    json.dump({**cfg, "model_type": "llama"}, open(path / "config.json", "w"))
    with pytest.raises(ModelConfigError, match="model_type"):
        verify.verify_model(str(path), ParallelLayout())


@pytest.mark.parametrize(
    "arch, layout, match",
    [
        ("qwen3", ParallelLayout(tp=8), "num_attention_heads=4"),
        ("qwen3", ParallelLayout(tp=4), "num_key_value_heads"),
        ("qwen3_moe", ParallelLayout(ep=8), "num_experts=4"),
        ("qwen3", ParallelLayout(ep=2), "needs a MoE model"),
    ],
)
def test_bad_layout_refused_up_front(tiny_model, no_spawn, arch, layout, match):
    with pytest.raises(ParallelLayoutError, match=match):
        verify.verify_model(tiny_model(arch), layout)


def test_missing_tensor_refused_up_front(tiny_model, tmp_path, no_spawn):
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    path = shutil.copytree(tiny_model("qwen3_moe"), tmp_path / "m")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="experts.3.up_proj"):
        verify.verify_model(str(path), ParallelLayout(ep=2))


def test_prompt_without_tokenizer_refused_up_front(tiny_model, tmp_path, no_spawn, capsys):
    from megatron_rl.cli import main

    assert main(["verify-model", "--hf", _without_tokenizer(tiny_model, tmp_path), "--prompt", "2 + 2"]) == 2
    assert "no tokenizer files" in capsys.readouterr().err
