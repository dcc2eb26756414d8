"""Bring up (and tear down) Megatron's process groups for a `ParallelLayout` on an initialised torch.distributed.

    initialize_parallel(ParallelLayout(tp=2, ep=2), seed=1234)   # after dist.init_process_group(...)
    ...
    destroy_parallel()

On a machine without CUDA this first applies the megatron-core CPU compatibility layer (see cpu_compat.py).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_rl.parallel.cpu_compat import apply_cpu_compat
from megatron_rl.parallel.layout import ParallelLayout


def init_distributed_from_env(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun-style env vars (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    A no-op when already initialised. gloo on CPU, nccl on CUDA unless `backend` says otherwise.
    Under torchrun env:// is required (its agent store owns MASTER_PORT).
    """
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group(backend=backend, init_method="env://")
    return dist.get_rank(), dist.get_world_size()


def initialize_parallel(layout: ParallelLayout, seed: int = 1234) -> int:
    """Create Megatron's TP/PP/CP/DP/EP groups for `layout` and seed the TP-aware RNG tracker.

    Returns the data-parallel size. Raises ParallelLayoutError (before creating any group) when the layout
    does not fit the world size.
    """
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; call init_distributed_from_env() first")
    dp = layout.data_parallel_size(dist.get_world_size())
    apply_cpu_compat()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**layout.megatron_sizes(), create_gloo_process_groups=True)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return dp


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
