"""convert_to_hf on single-process checkpoints laid out like Megatron's (see helpers.py): exact tensors,
dtype handling, sharding, and a clear refusal of every kind of mismatched or incomplete input."""
import json
import os
import shutil

import pytest
import torch

from megatron_rl.checkpoint.convert import convert_to_hf
from megatron_rl.checkpoint.dcp_reader import DistCheckpointError
from megatron_rl.checkpoint.format import (
    CheckpointFormatError,
    CheckpointInfo,
    arch_summary,
    copy_hf_side_files,
    write_info,
)
from megatron_rl.checkpoint.model_ckpt import SHARDED_STATE_DICT_METADATA
from megatron_rl.models.hf_io import HFCheckpointReader
from megatron_rl.models.qwen_arch import ModelConfigError, load_arch
from tests.unit.checkpoint.helpers import assert_same_tensors, megatron_key_tensors, write_dcp


def make_checkpoint(hf_dir, out, *, stack_layers=False, tensors=None):
    write_dcp(os.path.join(out, "model"), tensors if tensors is not None else megatron_key_tensors(hf_dir, stack_layers))
    copy_hf_side_files(hf_dir, os.path.join(out, "hf_config"))
    write_info(out, CheckpointInfo(arch=arch_summary(load_arch(hf_dir)), layout={"tp": 1}, world_size=1,
                                   dtype="float32", sharded_metadata=dict(SHARDED_STATE_DICT_METADATA)))
    return out


@pytest.mark.parametrize("arch,stack", [("qwen2", False), ("qwen3", True), ("qwen3_moe", False)])
def test_exact_roundtrip_of_every_tensor_and_side_file(tiny_model, tmp_path, arch, stack):
    hf = tiny_model(arch)
    ckpt = make_checkpoint(hf, str(tmp_path / "ckpt"), stack_layers=stack)
    report = convert_to_hf(ckpt, tmp_path / "out", progress=False)
    assert_same_tensors(hf, tmp_path / "out")
    assert report.num_tensors == len(HFCheckpointReader(hf).names())
    assert json.load(open(tmp_path / "out" / "config.json")) == json.load(open(os.path.join(hf, "config.json")))
    for name in ("tokenizer.json", "generation_config.json"):
        assert open(os.path.join(hf, name), "rb").read() == open(tmp_path / "out" / name, "rb").read()


def test_bf16_output_and_multiple_shards_with_index(tiny_model, tmp_path):
    hf = tiny_model("qwen3_moe")
    ckpt = make_checkpoint(hf, str(tmp_path / "ckpt"))
    report = convert_to_hf(ckpt, tmp_path / "out", dtype="bfloat16", max_shard_bytes=100_000, progress=False)
    assert len(report.files) > 1 and os.path.isfile(tmp_path / "out" / "model.safetensors.index.json")
    assert_same_tensors(hf, tmp_path / "out", dtype=torch.bfloat16)
    assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == "bfloat16"


def test_tied_embeddings_write_no_lm_head(tiny_model, tmp_path):
    hf = tiny_model("qwen3", tie_word_embeddings=True)
    convert_to_hf(make_checkpoint(hf, str(tmp_path / "ckpt")), tmp_path / "out", progress=False)
    assert "lm_head.weight" not in HFCheckpointReader(tmp_path / "out").names()
    assert_same_tensors(hf, tmp_path / "out")


def test_config_of_another_model_is_refused_naming_fields(tiny_model, tmp_path):
    ckpt = make_checkpoint(tiny_model("qwen3"), str(tmp_path / "ckpt"))
    with pytest.raises(ModelConfigError, match=r"(?s)does not match the checkpoint's model.*num_layers: 2 != 4"):
        convert_to_hf(ckpt, tmp_path / "out", hf_config_dir=tiny_model("qwen3", num_layers=4), progress=False)
    with pytest.raises(ModelConfigError, match="model_type: 'qwen3' != 'qwen3_moe'"):
        convert_to_hf(ckpt, tmp_path / "out", hf_config_dir=tiny_model("qwen3_moe"), progress=False)
    assert not (tmp_path / "out").exists()


def test_checkpoint_tensors_that_disagree_with_the_config_are_refused(tiny_model, tmp_path):
    hf = tiny_model("qwen3")
    tensors = megatron_key_tensors(hf)
    missing = dict(tensors)
    del missing["decoder.layers.1.self_attention.k_layernorm.weight"]
    with pytest.raises(DistCheckpointError, match=r"1 tensor\(s\) the config needs are not in the checkpoint, e\.g\. "
                                                 r"\['decoder\.layers\.1\.self_attention\.k_layernorm\.weight'\]"):
        convert_to_hf(make_checkpoint(hf, str(tmp_path / "a"), tensors=missing), tmp_path / "out", progress=False)
    extra = {**tensors, "decoder.layers.1.mlp.router.weight": torch.zeros(4, 64)}
    with pytest.raises(DistCheckpointError, match="not explained by the config, e.g. \\['decoder.layers.1.mlp.router.weight'\\]"):
        convert_to_hf(make_checkpoint(hf, str(tmp_path / "b"), tensors=extra), tmp_path / "out", progress=False)
    hidden = tensors["decoder.final_layernorm.weight"].numel()
    wrong = {**tensors, "decoder.final_layernorm.weight": torch.zeros(hidden + 1)}
    with pytest.raises(DistCheckpointError, match=rf"decoder\.final_layernorm\.weight: checkpoint \({hidden + 1},\), "
                                                  rf"config\.json implies \({hidden},\)"):
        convert_to_hf(make_checkpoint(hf, str(tmp_path / "c"), tensors=wrong), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_or_truncated_shard_files_are_refused_before_writing(tiny_model, tmp_path):
    hf = tiny_model("qwen3")
    ckpt = make_checkpoint(hf, str(tmp_path / "ckpt"))
    data = sorted(f for f in os.listdir(os.path.join(ckpt, "model")) if f.endswith(".distcp"))[0]
    path = os.path.join(ckpt, "model", data)
    backup = str(tmp_path / "backup")
    shutil.copyfile(path, backup)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DistCheckpointError, match=f"{data} is truncated"):
        convert_to_hf(ckpt, tmp_path / "out", progress=False)
    os.remove(path)
    with pytest.raises(DistCheckpointError, match=rf"missing: \['{data}'\]"):
        convert_to_hf(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_corrupt_data_fails_without_leaving_an_output_folder(tiny_model, tmp_path):
    ckpt = make_checkpoint(tiny_model("qwen3"), str(tmp_path / "ckpt"))
    data = sorted(f for f in os.listdir(os.path.join(ckpt, "model")) if f.endswith(".distcp"))[0]
    path = os.path.join(ckpt, "model", data)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # same length, garbage payload: found only while converting
        f.write(b"\x00" * size)
    with pytest.raises(DistCheckpointError, match="cannot read"):
        convert_to_hf(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unfinished_checkpoint_and_existing_output_are_refused(tiny_model, tmp_path):
    hf = tiny_model("qwen3")
    unfinished = make_checkpoint(hf, str(tmp_path / "step_5.tmp-20250101-000000-1"))
    with pytest.raises(CheckpointFormatError, match="did not finish"):
        convert_to_hf(unfinished, tmp_path / "out", progress=False)
    ckpt = make_checkpoint(hf, str(tmp_path / "ckpt"))
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_to_hf(ckpt, tmp_path / "out", progress=False)
    convert_to_hf(ckpt, tmp_path / "out", progress=False, overwrite=True)
    assert_same_tensors(hf, tmp_path / "out")


def test_checkpoint_without_hf_config_asks_for_one_and_a_missing_tokenizer_is_reported(tiny_model, tmp_path):
    hf = tiny_model("qwen3")
    ckpt = make_checkpoint(hf, str(tmp_path / "ckpt"))
    shutil.rmtree(os.path.join(ckpt, "hf_config"))
    with pytest.raises(CheckpointFormatError, match=r"no hf_config/config.json .*\(--hf-config DIR\)"):
        convert_to_hf(ckpt, tmp_path / "out", progress=False)
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copyfile(os.path.join(hf, "config.json"), config_only / "config.json")
    with pytest.warns(UserWarning, match="has no tokenizer files"):
        convert_to_hf(ckpt, tmp_path / "out", hf_config_dir=config_only, progress=False)
    assert_same_tensors(hf, tmp_path / "out")
    convert_to_hf(ckpt, tmp_path / "out2", hf_config_dir=hf, progress=False)
    assert os.path.isfile(tmp_path / "out2" / "tokenizer.json")


def test_progress_bar_counts_the_bytes_written(tiny_model, tmp_path, capsys):
    ckpt = make_checkpoint(tiny_model("qwen3"), str(tmp_path / "ckpt"))
    report = convert_to_hf(ckpt, tmp_path / "out", progress=True)
    from tqdm import tqdm

    err = capsys.readouterr().err
    total = tqdm.format_sizeof(report.total_bytes)  # e.g. "1.71M"
    assert "convert_to_hf: 100%" in err and f"| {total}/{total} [" in err, err  # counted tensor by tensor to the end


_PEAK_RSS_SCRIPT = """
import gc, json, re, sys
from megatron_rl.checkpoint.convert import convert_to_hf

def kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # Linux: reset this process's peak RSS (VmHWM) to its current RSS, so imports do not count
base = kib("VmRSS")
convert_to_hf(sys.argv[1], sys.argv[2], max_shard_bytes=int(sys.argv[3]), progress=False)
print(json.dumps({"extra_bytes": (kib("VmHWM") - base) * 1024}))
"""


def _conversion_peak_extra_bytes(ckpt: str, out: str, max_shard_bytes: int) -> int:
    """Peak RSS of a fresh process during convert_to_hf, above its RSS just before (bytes)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, ckpt, out, str(max_shard_bytes)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["extra_bytes"]


@pytest.mark.slow  # ~40 s: two 65 / 254 MB models made, saved and converted twice each
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_memory_is_bounded_by_the_shard_size_not_the_model_size(tiny_model, tmp_path):
    """Streaming: with small output shards the conversion's peak memory does not grow with the model (measured
    ~79 MB extra for both 65 MB and 254 MB fp32 models with 8 MB shards). The same measurement with one shard
    (the whole model held before writing) grows by about the model's size, so the measure itself can see it."""
    size = dict(hidden_size=512, num_attention_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=2048)
    extra, model_bytes = {}, {}
    for layers in (4, 16):
        hf = tiny_model("qwen3", num_layers=layers, **size)
        ckpt = make_checkpoint(hf, str(tmp_path / f"ckpt{layers}"))
        model_bytes[layers] = sum(t.numel() * t.element_size() for t in megatron_key_tensors(hf).values())
        for shard in (8_000_000, 10**12):
            extra[layers, shard] = _conversion_peak_extra_bytes(ckpt, str(tmp_path / f"out{layers}_{shard}"), shard)
    growth = model_bytes[16] - model_bytes[4]  # ~190 MB
    # allocator noise is a few MB; a conversion that kept the model (or a second copy of it) would grow by >= growth
    assert extra[16, 8_000_000] - extra[4, 8_000_000] < 0.25 * growth, (extra, model_bytes)
    assert extra[16, 8_000_000] < 0.5 * model_bytes[16], (extra, model_bytes)
    assert extra[16, 10**12] - extra[4, 10**12] > 0.75 * growth, (extra, model_bytes)  # the control
