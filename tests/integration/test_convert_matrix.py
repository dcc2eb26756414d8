"""The conversion matrix beyond one layout per architecture (slow: ~5 minutes on 2 cores).

For each case: HF -> Megatron checkpoint in the layout (convert_from_hf, --verify: the saved checkpoint reloaded
in that layout gives transformers' logits), -> HF (convert_to_hf: every tensor equals the original, cast to the
checkpoint dtype), and the checkpoint loaded into one rank (TP=PP=EP=1) still gives the original's logits.
"""
import pytest
import torch

from megatron_rl.checkpoint.convert import convert_from_hf, convert_to_hf, verify_checkpoint
from megatron_rl.parallel.layout import ParallelLayout
from tests.unit.checkpoint.helpers import assert_same_tensors

CASES = [
    pytest.param("qwen3", ParallelLayout(pp=2), {}, None, None, id="qwen3-pp2"),
    pytest.param("qwen3", ParallelLayout(pp=2, vpp=2), {"num_layers": 4}, None, None, id="qwen3-pp2-vpp2"),
    pytest.param("qwen3", ParallelLayout(tp=2), {"tie_word_embeddings": True}, None, None, id="qwen3-tp2-tied"),
    pytest.param("qwen3_moe", ParallelLayout(tp=2, ep=2, etp=2), {}, None, None, id="qwen3_moe-tp2-ep2-etp2"),
    pytest.param("qwen3_moe", ParallelLayout(ep=2, pp=2), {}, "bfloat16", None, id="qwen3_moe-ep2-pp2-bf16"),
    pytest.param("qwen2", ParallelLayout(tp=2), {}, None, 4, id="qwen2-tp2-dp2"),  # DP=2: fully parallel save
]
DTYPES = {None: None, "bfloat16": torch.bfloat16}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("arch,layout,size,dtype,world_size", CASES)
def test_conversion_matrix(tiny_model, tmp_path, arch, layout, size, dtype, world_size):
    hf = tiny_model(arch, **size)
    report = convert_from_hf(hf, tmp_path / "ckpt", layout, dtype=dtype, world_size=world_size, verify=True)
    # fp32 forwards of identical weights (bf16 cases: both sides rounded to bf16): rounding-order noise only
    assert report.parity.ok and report.parity.max_abs_diff <= 1e-4, report.parity
    convert_to_hf(tmp_path / "ckpt", tmp_path / "hf", progress=False)
    assert_same_tensors(hf, tmp_path / "hf", dtype=DTYPES[dtype])
    single = verify_checkpoint(tmp_path / "ckpt", hf, layout=ParallelLayout())
    assert single.ok and single.max_abs_diff <= 1e-4, single
