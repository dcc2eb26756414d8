"""megatron_rl.json, architecture summaries and their comparison, HF side files."""
import json
import os

import pytest

from megatron_rl.checkpoint.format import (
    CheckpointFormatError,
    CheckpointInfo,
    arch_summary,
    check_arch_matches,
    copy_hf_side_files,
    read_info,
    summary_mismatches,
    write_info,
)
from megatron_rl.checkpoint.names import INFO_FILE
from megatron_rl.models.qwen_arch import ModelConfigError, arch_from_dict
from tests.unit.models.test_qwen_arch import QWEN3_30B_A3B, QWEN25_7B


def info_for(arch):
    return CheckpointInfo(arch=arch_summary(arch), layout={"tp": 2}, world_size=2, dtype="bfloat16",
                          sharded_metadata={"non_homogeneous_layers": True})


def test_summary_is_json_ready_and_ignores_storage_and_training_settings():
    moe = arch_from_dict(QWEN3_30B_A3B)
    summary = arch_summary(moe)
    assert json.loads(json.dumps(summary)) == summary
    assert "raw" not in summary and "torch_dtype" not in summary and "router_aux_loss_coef" not in summary["moe"]
    other = arch_from_dict({**QWEN3_30B_A3B, "torch_dtype": "float32", "router_aux_loss_coef": 0.5})
    assert summary_mismatches(summary, arch_summary(other)) == []


def test_mismatches_name_each_field_including_nested_moe_fields():
    a = arch_summary(arch_from_dict(QWEN3_30B_A3B))
    b = arch_summary(arch_from_dict({**QWEN3_30B_A3B, "num_experts": 64, "rope_theta": 10000.0}))
    assert summary_mismatches(a, b) == ["moe.num_experts: 128 != 64", "rope_theta: 1000000.0 != 10000.0"]
    dense = arch_summary(arch_from_dict(QWEN25_7B))
    lines = summary_mismatches(a, dense)
    assert any(line.startswith("moe: {") and line.endswith("!= None") for line in lines)
    assert "model_type: 'qwen3_moe' != 'qwen2'" in lines


def test_info_roundtrip_and_arch_check(tmp_path):
    arch = arch_from_dict(QWEN3_30B_A3B)
    write_info(str(tmp_path), info_for(arch))
    info = read_info(str(tmp_path))
    assert info.arch == arch_summary(arch) and info.dtype == "bfloat16" and info.world_size == 2
    assert "versions" in info.extra and "created" in info.extra
    check_arch_matches(info, arch, what="config.json")  # same model: no error
    with pytest.raises(ModelConfigError, match=r"(?s)does not match the checkpoint's model.*num_hidden|num_layers: 48 != 24"):
        check_arch_matches(info, arch_from_dict({**QWEN3_30B_A3B, "num_hidden_layers": 24}), what="config.json")


def test_unfinished_foreign_and_newer_directories_are_refused(tmp_path):
    arch = arch_from_dict(QWEN25_7B)
    tmp_dir = tmp_path / "step_1.tmp-20250101-1"
    tmp_dir.mkdir()
    write_info(str(tmp_dir), info_for(arch))
    with pytest.raises(CheckpointFormatError, match="temporary directory of a save that did not finish"):
        read_info(str(tmp_dir))
    step = tmp_path / "step_2"
    (step / "model").mkdir(parents=True)
    write_info(str(step), info_for(arch))
    with pytest.raises(CheckpointFormatError, match="pass its parent directory"):
        read_info(str(step / "model"))
    payload = json.loads((step / INFO_FILE).read_text())
    (step / INFO_FILE).write_text(json.dumps({**payload, "format_version": 99}))
    with pytest.raises(CheckpointFormatError, match="format_version 99 is newer"):
        read_info(str(step))
    (step / INFO_FILE).write_text(json.dumps({**payload, "format": "something_else"}))
    with pytest.raises(CheckpointFormatError, match="field 'format'"):
        read_info(str(step))
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        read_info(str(tmp_path / "nowhere"))


def test_side_files_copied_and_weights_left_behind(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "merges.txt", "vocab.json", "model.safetensors",
                 "model.safetensors.index.json", "pytorch_model.bin", "README.md"):
        (src / name).write_text("{}")
    copied = copy_hf_side_files(str(src), str(tmp_path / "out"), config={"model_type": "qwen3"})
    assert copied == ["chat_template.jinja", "config.json", "generation_config.json", "merges.txt",
                      "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    assert sorted(os.listdir(tmp_path / "out")) == copied
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"model_type": "qwen3"}
