"""Save and load the model part of a training checkpoint with Megatron's distributed checkpointing.

    # every rank (collective):
    save_model_checkpoint(chunks, arch, layout, "/ckpt/run1/step_000100", hf_source_dir="/models/Qwen3-8B")
    load_model_checkpoint(chunks, "/ckpt/run1/step_000100")      # any TP/PP/EP/VPP/DP layout: reshards

    # composing a full training checkpoint (model + optimizer + trainer state) in one atomic directory:
    with atomic_checkpoint_dir(step_dir) as tmp:                 # same temp dir on every rank
        write_model_checkpoint(chunks, arch, layout, tmp, hf_source_dir=hf_dir)
        dist_checkpointing.save(optimizer.sharded_state_dict(model_sharded_state_dict(chunks)),
                                os.path.join(tmp, "optimizer"))   # (create the folder first, on rank 0)
        if rank == 0: write trainer_state.json into tmp
    # leaving the block without an exception renames tmp -> step_dir on rank 0 after a barrier

The tensors are written with `megatron.core.dist_checkpointing.save` (torch_dist backend = PyTorch DCP) from the
model's `sharded_state_dict()`, which names every tensor by its *global* identity (global layer and expert
index, full shape, this rank's offsets), so a checkpoint saved in one layout loads in any other: DCP reads, for
every rank, exactly the slices it needs. The sharded-state-dict options are fixed in SHARDED_STATE_DICT_METADATA
(per-layer keys, stacked experts) and recorded in megatron_rl.json; the optimizer's sharded state dict must be
built from `model_sharded_state_dict(chunks)` so that both use the same keys.

Loading checks, before reading any tensor, that the checkpoint's architecture (megatron_rl.json) equals the one
of the model being loaded (sizes, heads, norms, MoE routing, RoPE base, tied embeddings) and raises naming each
differing field. Tensors missing from the checkpoint are an error; only Transformer-Engine `_extra_state` byte
objects (FP8 metadata, empty without FP8) may be absent on either side.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
import warnings
from typing import Any, Iterator

import torch
import torch.distributed as dist

from megatron_rl.checkpoint.format import (
    CheckpointFormatError,
    CheckpointInfo,
    arch_summary,
    check_arch_matches,
    copy_hf_side_files,
    read_info,
    summary_mismatches,
    write_hf_config,
    write_info,
)
from megatron_rl.checkpoint.names import HF_CONFIG_DIR, MODEL_DIR, TMP_MARKER
from megatron_rl.models.qwen_arch import ModelConfigError, QwenArch, load_arch
from megatron_rl.parallel.layout import ParallelLayout

# Options of GPTModel.sharded_state_dict(metadata=...) used for every save and load of a model (and for the
# optimizer state built from it). Per-layer keys (`decoder.layers.<L>....`): upstream's direction (the stacked
# layout is deprecated in 0.16) and what Megatron already uses for MoE models; experts stay stacked per layer.
SHARDED_STATE_DICT_METADATA: dict[str, Any] = {"non_homogeneous_layers": True, "singleton_local_shards": False}
EXTRA_STATE_SUFFIX = "_extra_state"

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def unwrap_model(chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(chunks: list) -> dict:
    """The sharded state dict of this rank's model chunks (`model`, or `model0`, `model1`, ... with VPP)."""
    models = [unwrap_model(c) for c in chunks]
    if len(models) == 1:
        return {"model": models[0].sharded_state_dict(metadata=dict(SHARDED_STATE_DICT_METADATA))}
    return {f"model{i}": m.sharded_state_dict(metadata=dict(SHARDED_STATE_DICT_METADATA)) for i, m in enumerate(models)}


# ------------------------------------------------------------------------------------------------------------
# Architecture of a built model, for comparison with a checkpoint's
# ------------------------------------------------------------------------------------------------------------
def model_arch_summary(chunks: list) -> dict[str, Any]:
    """The arch_summary fields that a built GPTModel determines (same keys and meaning as `arch_summary`)."""
    model = unwrap_model(chunks[0])
    cfg = model.config
    moe = None
    if cfg.num_moe_experts:
        freq = cfg.moe_layer_freq
        layers = [bool(x) for x in freq] if isinstance(freq, (list, tuple)) else [i % freq == 0 for i in range(cfg.num_layers)]
        moe = {
            "num_experts": cfg.num_moe_experts,
            "top_k": cfg.moe_router_topk,
            "expert_ffn_hidden_size": cfg.moe_ffn_hidden_size,
            "norm_topk_prob": not cfg.moe_router_pre_softmax,
            "moe_layers": layers,
        }
    return {
        "vocab_size": model.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_kv_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "rms_norm_eps": cfg.layernorm_epsilon,
        "max_position_embeddings": model.max_sequence_length,
        "tie_word_embeddings": bool(model.share_embeddings_and_output_weights),
        "qkv_bias": bool(cfg.add_qkv_bias),
        "qk_norm": bool(cfg.qk_layernorm),
        "moe": moe,
    }


def _restrict(summary: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in like.items():
        theirs = summary.get(key)
        if isinstance(value, dict) and isinstance(theirs, dict):
            out[key] = {k: theirs.get(k) for k in value}
        else:
            out[key] = theirs
    return out


def _rope_mismatch(chunks: list, rope_theta: float) -> str | None:
    """GPTModel does not keep the RoPE base it was built with; compare the inverse frequencies it derived."""
    rotary = getattr(unwrap_model(chunks[0]), "rotary_pos_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return None
    have = rotary.inv_freq.detach().float().cpu()
    dim = 2 * have.numel()
    want = 1.0 / (rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not torch.allclose(have, want, rtol=1e-5, atol=0.0):  # a different base changes inv_freq by >> 1e-5
        return f"rope_theta: {rope_theta!r} != the model's RoPE base (its inverse frequencies differ)"
    return None


def check_model_matches(chunks: list, arch_or_summary: QwenArch | dict[str, Any], *, what: str) -> None:
    """Raise ModelConfigError listing every field where the built model differs from `arch_or_summary`."""
    summary = arch_summary(arch_or_summary) if isinstance(arch_or_summary, QwenArch) else arch_or_summary
    model = model_arch_summary(chunks)
    diffs = summary_mismatches(_restrict(summary, model), model)
    rope = _rope_mismatch(chunks, float(summary["rope_theta"])) if "rope_theta" in summary else None
    if rope:
        diffs.append(rope)
    if diffs:
        raise ModelConfigError(f"the model does not match {what} ({what} != model):\n  " + "\n  ".join(diffs))


# ------------------------------------------------------------------------------------------------------------
# Atomic directories
# ------------------------------------------------------------------------------------------------------------
def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def atomic_checkpoint_dir(
    out_dir: str | os.PathLike, *, overwrite: bool = False, collective: bool | None = None
) -> Iterator[str]:
    """Yield a fresh temporary directory next to `out_dir`; rename it to `out_dir` when the block succeeds.

    Collective (every rank enters it and gets the same path) when `collective` is True, or None and
    torch.distributed is initialised; `collective=False` for a single process inside a distributed job. The rename happens on rank 0 after a barrier, so `out_dir` appears only once every
    rank has finished writing; a crash leaves `<out_dir>.tmp-<time>-<pid>`, which every reader refuses. All
    ranks must see the same filesystem. An existing `out_dir` is an error unless `overwrite` (then it is
    replaced, and removed once the new one is in place).
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    collective = _is_distributed() if collective is None else collective
    rank = dist.get_rank() if collective else 0
    reply = None
    if rank == 0:
        if os.path.lexists(out_dir) and not overwrite:
            reply = ("error", f"{out_dir} already exists; choose a new directory or overwrite it (--overwrite)")
        else:
            os.makedirs(os.path.dirname(out_dir), exist_ok=True)
            tmp = f"{out_dir}{TMP_MARKER}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            os.makedirs(tmp)
            reply = ("ok", tmp)
    if collective:
        box = [reply]
        dist.broadcast_object_list(box, src=0)
        reply = box[0]
    status, value = reply
    if status == "error":
        raise FileExistsError(value)
    yield value
    if collective:
        dist.barrier()
    if rank == 0:
        _commit(value, out_dir)
    if collective:
        dist.barrier()


def _commit(tmp: str, out_dir: str) -> None:
    if os.path.lexists(out_dir):
        old = f"{out_dir}{TMP_MARKER}replaced-{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


# ------------------------------------------------------------------------------------------------------------
# Save / load
# ------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_dcp_deprecations():
    """megatron-core 0.16.1 calls DCP APIs that torch 2.13 deprecates (load_state_dict, ShardedTensor); the
    FutureWarnings say nothing actionable to our users. Only these two exact messages are hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`load_state_dict` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"Please use DTensor instead", category=FutureWarning)
        yield


def _use_in_process_write_results() -> None:
    """Megatron's torch_dist writer hands its write results to the caller through a multiprocessing Manager queue,
    made on a process's first save (`filesystem_async._get_write_results_queue`: a spawned Python server process,
    ~1.2 s of a 2-core machine on the first checkpoint of every rank), so that an asynchronous save's writer process
    could report back. Every save here is synchronous: the results are put and taken in the saving process itself,
    so a plain in-process queue carries them (the writer's forked workers report through their own queue)."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _save_strategy(fully_parallel: bool):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    _use_in_process_write_results()
    strategy = get_default_save_sharded_strategy("torch_dist")
    if fully_parallel and ps.get_data_parallel_world_size(with_context_parallel=True) > 1:
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        # DP replicas split the writing of the replicated tensors instead of DP rank 0 writing all of them
        strategy = FullyParallelSaveStrategyWrapper(strategy, ps.get_data_parallel_group(with_context_parallel=True))
    return strategy


def _param_dtype(chunks: list) -> str:
    for chunk in chunks:
        for param in unwrap_model(chunk).parameters():
            return DTYPE_NAMES.get(param.dtype, str(param.dtype).removeprefix("torch."))
    raise ValueError("the model chunks have no parameters")


def write_model_checkpoint(
    chunks: list,
    arch: QwenArch,
    layout: ParallelLayout,
    ckpt_dir: str | os.PathLike,
    *,
    hf_source_dir: str | os.PathLike | None = None,
    fully_parallel: bool = True,
) -> None:
    """Collective: write `model/`, `hf_config/` and `megatron_rl.json` into an existing `ckpt_dir` (no rename).

    Use inside `atomic_checkpoint_dir` (or call `save_model_checkpoint`, which does). `hf_source_dir`: the HF
    folder the model came from; its config, tokenizer and generation files are copied into `hf_config/` (its
    config.json must describe `arch`). Without it, `hf_config/config.json` is written from `arch.raw`.
    fully_parallel: spread the writing of DP-replicated tensors over the data-parallel ranks.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = os.fspath(ckpt_dir)
    check_model_matches(chunks, arch, what="the arch passed to write_model_checkpoint")
    if hf_source_dir is not None:
        source_arch = load_arch(hf_source_dir)
        diffs = summary_mismatches(arch_summary(arch), arch_summary(source_arch))
        if diffs:
            raise ModelConfigError(
                f"hf_source_dir {hf_source_dir} has a config.json for a different model (arch != its config):\n  "
                + "\n  ".join(diffs)
            )
    elif not arch.raw:
        raise ValueError("arch has no raw HF config (arch.raw is empty): pass hf_source_dir so config.json can be saved")
    model_dir = os.path.join(ckpt_dir, MODEL_DIR)
    rank = dist.get_rank()  # Megatron's save needs the initialised world anyway
    if rank == 0:
        os.makedirs(model_dir, exist_ok=True)
    dist.barrier()
    with _quiet_dcp_deprecations():
        dist_checkpointing.save(
            model_sharded_state_dict(chunks), model_dir, sharded_strategy=_save_strategy(fully_parallel),
            validate_access_integrity=True,
        )
    if rank == 0:
        hf_dir = os.path.join(ckpt_dir, HF_CONFIG_DIR)
        if hf_source_dir is not None:
            copy_hf_side_files(os.fspath(hf_source_dir), hf_dir)
        else:
            os.makedirs(hf_dir, exist_ok=True)
            write_hf_config(hf_dir, arch.raw)
        write_info(
            ckpt_dir,
            CheckpointInfo(
                arch=arch_summary(arch),
                layout=dataclasses.asdict(layout),
                world_size=dist.get_world_size(),
                dtype=_param_dtype(chunks),
                sharded_metadata=dict(SHARDED_STATE_DICT_METADATA),
                extra={"hf_source_dir": os.path.abspath(hf_source_dir) if hf_source_dir else None},
            ),
        )
    dist.barrier()


def save_model_checkpoint(
    chunks: list,
    arch: QwenArch,
    layout: ParallelLayout,
    out_dir: str | os.PathLike,
    hf_source_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    fully_parallel: bool = True,
) -> str:
    """Collective: save a self-contained model checkpoint to `out_dir` atomically; returns its absolute path."""
    with atomic_checkpoint_dir(out_dir, overwrite=overwrite) as tmp:
        write_model_checkpoint(chunks, arch, layout, tmp, hf_source_dir=hf_source_dir, fully_parallel=fully_parallel)
    return os.path.abspath(os.fspath(out_dir))


def _check_sharded_metadata(info: CheckpointInfo, ckpt_dir: str) -> None:
    if info.sharded_metadata != SHARDED_STATE_DICT_METADATA:
        raise CheckpointFormatError(
            f"{ckpt_dir} was saved with sharded-state-dict options {info.sharded_metadata}, this version uses "
            f"{SHARDED_STATE_DICT_METADATA}; convert it with tools/convert_to_hf.py and back with convert_from_hf.py"
        )


def check_model_checkpoint(ckpt_dir: str | os.PathLike, arch: QwenArch, *, what: str) -> CheckpointInfo:
    """Cheap checks that `ckpt_dir` can be loaded into a model of `arch` (described by `what`), for callers that want
    to fail before starting any process or reading any tensor: a finished megatron_rl checkpoint (`read_info`:
    refuses `.tmp-` and foreign directories), sharded-state-dict options this version reads, the same architecture
    (`check_arch_matches` names every differing field) and every shard file present and complete. No process
    group needed; reads only JSON and the DCP metadata. `load_model_checkpoint` checks the first three again
    against the built model."""
    from megatron_rl.checkpoint.dcp_reader import DistCheckpointReader

    ckpt_dir = os.fspath(ckpt_dir)
    info = read_info(ckpt_dir)
    _check_sharded_metadata(info, ckpt_dir)
    check_arch_matches(info, arch, what=what)
    DistCheckpointReader(os.path.join(ckpt_dir, MODEL_DIR)).check_files()
    return info


def load_model_checkpoint(chunks: list, ckpt_dir: str | os.PathLike) -> CheckpointInfo:
    """Collective: load the model weights of a checkpoint directory into `chunks` (built in any layout).

    Raises ModelConfigError when the checkpoint's architecture differs from the model's (before reading any
    tensor), CheckpointFormatError for an unfinished/foreign directory or tensors missing from it.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt_dir = os.fspath(ckpt_dir)
    info = read_info(ckpt_dir)
    check_model_matches(chunks, info.arch, what=f"the checkpoint {ckpt_dir}")
    _check_sharded_metadata(info, ckpt_dir)
    model_dir = os.path.join(ckpt_dir, MODEL_DIR)
    sharded = model_sharded_state_dict(chunks)
    with _quiet_dcp_deprecations():
        loaded, ckpt_only, model_only = dist_checkpointing.load(sharded, model_dir, strict=StrictHandling.RETURN_ALL)
    # Megatron's naming: "missing" = in the checkpoint, not requested; "unexpected" = requested, not in it.
    absent = sorted(k for k in model_only if not k.endswith(EXTRA_STATE_SUFFIX))
    if absent:
        raise CheckpointFormatError(
            f"{ckpt_dir}: {len(absent)} tensor(s) of the model are not in the checkpoint, e.g. {absent[:5]}"
        )
    unused = sorted(k for k in ckpt_only if not k.endswith(EXTRA_STATE_SUFFIX))
    if unused:
        raise CheckpointFormatError(
            f"{ckpt_dir}: {len(unused)} checkpoint tensor(s) have no place in the model, e.g. {unused[:5]}"
        )
    names = list(sharded)
    for name, chunk in zip(names, chunks):
        result = unwrap_model(chunk).load_state_dict(loaded[name], strict=False)
        bad = [k for k in list(result.missing_keys) + list(result.unexpected_keys) if not k.endswith(EXTRA_STATE_SUFFIX)]
        if bad:
            raise CheckpointFormatError(f"{ckpt_dir}: loading into the model left parameters unmatched: {bad[:5]}")
    return info
