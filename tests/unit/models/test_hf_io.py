"""HF checkpoint reading/validation and the streaming sharded writer."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_rl.models.hf_io import CheckpointError, HFCheckpointReader, write_hf_safetensors
from megatron_rl.models.qwen_arch import load_arch


def test_tiny_checkpoint_validates(tiny_model):
    path = tiny_model("qwen3_moe")
    HFCheckpointReader(path).validate(load_arch(path))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_tensor_is_reported(tiny_model, tmp_path):
    path = _copy(tiny_model("qwen2"), tmp_path / "m")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 tensor.*k_proj.bias"):
        HFCheckpointReader(path).validate(load_arch(path))


def test_unexpected_and_misshaped_tensors_are_reported(tiny_model, tmp_path):
    path = _copy(tiny_model("qwen3"), tmp_path / "m")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    save_file({**tensors, "model.layers.0.mlp.extra.weight": torch.zeros(2)}, os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not explain.*mlp.extra"):
        HFCheckpointReader(path).validate(load_arch(path))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="up_proj.weight' has shape \\(3, 3\\)"):
        HFCheckpointReader(path).validate(load_arch(path))


def test_config_from_another_model_is_refused(tiny_model, tmp_path):
    path = _copy(tiny_model("qwen3"), tmp_path / "m")
    cfg = json.load(open(os.path.join(path, "config.json")))
    json.dump({**cfg, "num_hidden_layers": 3}, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="missing 11 tensor.*model.layers.2"):
        HFCheckpointReader(path).validate(load_arch(path))


def test_truncated_file_is_reported(tiny_model, tmp_path):
    path = _copy(tiny_model("qwen3"), tmp_path / "m")
    f = os.path.join(path, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(CheckpointError):
        reader = HFCheckpointReader(path)
        for name in reader.names():
            reader.get(name)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a safetensors HF checkpoint"):
        HFCheckpointReader(tmp_path)


def test_sharded_write_roundtrip(tmp_path):
    tensors = {f"t{i}": torch.randn(64, 16) for i in range(10)}  # 4 KiB each
    shards = write_hf_safetensors(tmp_path, tensors.items(), max_shard_bytes=10_000)
    assert len(shards) == 5 and shards[0] == "model-00001-of-00005.safetensors"
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(tensors)
    reader = HFCheckpointReader(tmp_path)
    assert all(torch.equal(reader.get(n), t) for n, t in tensors.items())
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".partial")]


def test_single_shard_is_model_safetensors(tmp_path):
    assert write_hf_safetensors(tmp_path, [("a", torch.ones(2))]) == ["model.safetensors"]
    with pytest.raises(ValueError, match="written twice"):
        write_hf_safetensors(tmp_path / "x", [("a", torch.ones(2)), ("a", torch.ones(2))])
