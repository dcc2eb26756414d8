"""model.megatron_checkpoint is checked when the config loads (before Ray or any engine starts): each bad directory
fails with a ConfigError naming the key and the fix. Also: warm-up + KL is accepted now (the reference is reset)."""
import dataclasses
import os

import pytest

from megatron_rl.checkpoint.format import CheckpointInfo, arch_summary, write_info
from megatron_rl.checkpoint.model_ckpt import SHARDED_STATE_DICT_METADATA
from megatron_rl.config import ConfigError, load_config, model_arch
from megatron_rl.models.qwen_arch import arch_from_dict
from megatron_rl.models.tiny import TinySize, hf_config

BASE = ["data.synthetic.task=arithmetic"]  # the default model: a tiny Qwen3 (made at run time; arch from its sizes)


def _fake_checkpoint(path, arch, *, sharded_metadata=None):
    """A megatron_rl.json as write_model_checkpoint writes it, without tensors (model/ is absent)."""
    os.makedirs(path)
    write_info(str(path), CheckpointInfo(arch=arch_summary(arch), layout={"tp": 2}, world_size=2, dtype="float32",
                                         sharded_metadata=sharded_metadata or dict(SHARDED_STATE_DICT_METADATA)))
    return str(path)


def _default_arch():
    return model_arch(load_config(None, BASE))


def _error(tmp_path, ckpt):
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE + [f"model.megatron_checkpoint={ckpt}"])
    message = str(e.value)
    assert message.startswith(f"model.megatron_checkpoint={ckpt}: "), message
    assert "Fix: point model.megatron_checkpoint at a finished megatron_rl checkpoint" in message
    return message


def test_missing_directory(tmp_path):
    assert "does not exist" in _error(tmp_path, tmp_path / "nope")


def test_an_hf_folder_is_not_a_megatron_checkpoint(tiny_model, tmp_path):
    assert "has no megatron_rl.json: not a megatron_rl checkpoint directory" in _error(tmp_path, tiny_model("qwen3"))


def test_unfinished_save(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "step_000004.tmp-20250101-000000-123", _default_arch())
    assert "did not finish" in _error(tmp_path, ckpt)


def test_model_subdirectory_points_to_its_parent(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "step_000004", _default_arch())
    os.makedirs(os.path.join(ckpt, "model"))
    assert f"pass its parent directory {ckpt} instead" in _error(tmp_path, os.path.join(ckpt, "model"))


def test_another_architecture_names_each_field(tmp_path):
    default = TinySize()
    other = hf_config("qwen3", dataclasses.replace(default, num_layers=default.num_layers + 1, hidden_size=256),
                      eos_token_id=2, pad_token_id=0)
    message = _error(tmp_path, _fake_checkpoint(tmp_path / "other", arch_from_dict(other.to_dict())))
    assert f"num_layers: {default.num_layers + 1} != {default.num_layers}" in message
    assert f"hidden_size: 256 != {default.hidden_size}" in message


def test_other_key_layout(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "old", _default_arch(), sharded_metadata={"singleton_local_shards": True})
    assert "sharded-state-dict options" in _error(tmp_path, ckpt)


def test_tensor_files_missing(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "no_tensors", _default_arch())  # right JSON, no model/ directory
    assert "expected a Megatron distributed checkpoint" in _error(tmp_path, ckpt)


def test_warmup_with_kl_is_accepted():
    cfg = load_config(None, BASE + ["warmup.steps=2", "actor.loss.kl_coef=0.01"])
    assert cfg.warmup.steps == 2 and cfg.actor.loss.kl_coef == 0.01
