"""The optimizer part of a training checkpoint (`optimizer/` in a step directory, names.OPTIMIZER_DIR).

Megatron's optimizer state is saved as a distributed checkpoint "fully reshardable" (per-parameter tensors in model
space), so a checkpoint resumes under any DP size and parallel layout; megatron-core 0.16's other formats use the
`flattened_range` sharded tensors its own validation now rejects. Collective: every rank of the training world calls
these functions.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_rl.checkpoint.model_ckpt import _save_strategy, model_sharded_state_dict
from megatron_rl.checkpoint.names import OPTIMIZER_DIR

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _inner_optimizers(optimizer) -> list:
    return getattr(optimizer, "chained_optimizers", [optimizer])


def optimizer_has_state(optimizer, device: torch.device) -> bool:
    """Whether any rank's optimizer has stepped since it was built or reset (all ranks agree: one all-reduce)."""
    local = any(len(o.optimizer.state) > 0 for o in _inner_optimizers(optimizer))
    flag = torch.tensor([int(local)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def reset_optimizer_state(optimizer) -> None:
    """Forget Adam's moments and step count on this rank."""
    for inner in _inner_optimizers(optimizer):
        inner.optimizer.state.clear()


def save_optimizer_state(optimizer, model_chunks: list, ckpt_dir: str, device: torch.device) -> bool:
    """Write `optimizer`'s state into ckpt_dir/optimizer/; returns whether there was any to write.

    An optimizer that has not stepped since it was built or reset has no state; resuming then starts a fresh one,
    which is the same thing (Adam creates zero moments and step 0 on its first step)."""
    from megatron.core import dist_checkpointing

    has_state = optimizer_has_state(optimizer, device)
    if has_state:
        optimizer_dir = os.path.join(ckpt_dir, OPTIMIZER_DIR)
        if dist.get_rank() == 0:
            os.makedirs(optimizer_dir, exist_ok=True)
        dist.barrier()
        sharded = optimizer.sharded_state_dict(model_sharded_state_dict(model_chunks), metadata=OPTIMIZER_METADATA)
        dist_checkpointing.save(sharded, optimizer_dir, sharded_strategy=_save_strategy(True))
    dist.barrier()
    return has_state


def load_optimizer_state(optimizer, model_chunks: list, ckpt_dir: str) -> None:
    """Restore the state `save_optimizer_state` wrote (any saved layout)."""
    from megatron.core import dist_checkpointing

    optimizer_dir = os.path.join(ckpt_dir, OPTIMIZER_DIR)
    if not os.path.isdir(optimizer_dir):
        raise FileNotFoundError(f"{ckpt_dir} has no {OPTIMIZER_DIR}/ (a model-only checkpoint?); "
                                "resume with load_optimizer=False to start a fresh optimizer")
    sharded = optimizer.sharded_state_dict(model_sharded_state_dict(model_chunks), is_loading=True,
                                           metadata=OPTIMIZER_METADATA)
    optimizer.load_state_dict(dist_checkpointing.load(sharded, optimizer_dir))
