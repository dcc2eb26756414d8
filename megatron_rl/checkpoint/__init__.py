"""Training checkpoints (model part) and Hugging Face conversion.

Directory layout of one checkpoint (a training step, or the output of tools/convert_from_hf.py):

    <step_dir>/
      megatron_rl.json      format name + version, architecture summary, layout + world size it was saved with,
                            parameter dtype, sharded-state-dict options, library versions (format.py)
      model/                Megatron dist checkpoint (torch_dist = PyTorch DCP) of the model's sharded_state_dict:
        .metadata             DCP metadata (global shape/dtype of every key, chunk -> file/offset)
        __<rank>_<n>.distcp   tensor data written by each rank
        common.pt, metadata.json
      hf_config/            config.json, tokenizer files, generation_config.json of the HF source model
      optimizer/            (written by the trainer) dist checkpoint of the optimizer state
      trainer_state.json    (written by the trainer) step, data-sampler position, RNG, ...

The whole directory is written as `<step_dir>.tmp-<time>-<pid>` and renamed to `<step_dir>` by rank 0 after a
barrier (`atomic_checkpoint_dir`), so a directory with the final name is always complete; readers refuse
`.tmp-` directories. Key names inside model/ are described in sharded_keys.py.

API (collective functions are called by every rank of the training world):
    save_model_checkpoint(chunks, arch, layout, out_dir, hf_source_dir=None)     collective, atomic
    load_model_checkpoint(chunks, ckpt_dir) -> CheckpointInfo                   collective, any layout
    check_model_checkpoint(ckpt_dir, arch, what=...) -> CheckpointInfo          up-front checks, no process group
    atomic_checkpoint_dir(out_dir) + write_model_checkpoint(chunks, arch, layout, tmp_dir, ...)
                                                                                to add optimizer/trainer state
    model_sharded_state_dict(chunks)    the model's sharded state dict (build the optimizer's from it)
    read_info(ckpt_dir) -> CheckpointInfo
    convert_to_hf(ckpt_dir, out_dir, ...), convert_from_hf(hf_dir, out_dir, layout, ...),
    verify_checkpoint(ckpt_dir, hf_dir, ...)                                    (convert.py; CPU tools)
"""
from megatron_rl.checkpoint.dcp_reader import DistCheckpointError, DistCheckpointReader
from megatron_rl.checkpoint.format import CheckpointFormatError, CheckpointInfo, read_info
from megatron_rl.checkpoint.model_ckpt import (
    SHARDED_STATE_DICT_METADATA,
    atomic_checkpoint_dir,
    check_model_checkpoint,
    load_model_checkpoint,
    model_sharded_state_dict,
    save_model_checkpoint,
    write_model_checkpoint,
)

__all__ = [
    "SHARDED_STATE_DICT_METADATA",
    "CheckpointFormatError",
    "CheckpointInfo",
    "DistCheckpointError",
    "DistCheckpointReader",
    "atomic_checkpoint_dir",
    "check_model_checkpoint",
    "load_model_checkpoint",
    "model_sharded_state_dict",
    "read_info",
    "save_model_checkpoint",
    "write_model_checkpoint",
]
