"""Make a sampling decision once, on one rank, and give every rank the same answer (docs/design.md, contract 3).

Dynamic sampling and LSPO must not run independently on each rank: ranks can hold different views of the same
rollouts (float noise in recomputed rewards, a different shard, a different arrival order), and two ranks that
choose different samples train different batches, which silently breaks data parallelism. So:

    result  = decide_on_rank0(fill_batch, generate_round, target, cfg)   # any picklable result
    indices = select_on_rank0(choose_indices, local_view)                # a 1-D int64 tensor of sample ids

`decide_fn` runs on the source rank only (global rank `src`, 0 by default); the other ranks never call it, so they
cannot disagree. Works with gloo and NCCL (tensors go through the backend's device). If `decide_fn` raises on the
source rank, every rank raises (the others with a RuntimeError that points at the source rank) instead of waiting
forever on a broadcast that never comes. Without an initialised process group both functions just call
`decide_fn` (single-process runs and unit tests).
"""
from __future__ import annotations

import pickle
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist


class Rank0DecisionError(RuntimeError):
    """The decision failed on the source rank; raised on the other ranks."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _check_src(src: int, group) -> None:
    ranks = dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
    if src not in ranks:
        raise ValueError(f"src={src} is not a global rank of the given process group (its ranks: {list(ranks)})")


def _device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def decide_on_rank0(decide_fn: Callable[..., Any], *args, group=None, src: int = 0, **kwargs) -> Any:
    """Run `decide_fn(*args, **kwargs)` on global rank `src` only and return its result on every rank of `group`.

    The result travels pickled (`broadcast_object_list`): return plain data (ids, counts, small dataclasses), not
    large tensors. Ranks other than `src` may pass placeholder args; they are not used there.
    """
    if not _distributed():
        return decide_fn(*args, **kwargs)
    _check_src(src, group)
    box: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank() == src:
        try:
            result = decide_fn(*args, **kwargs)
            # pickled here, inside the try, so an unpicklable result is reported to the other ranks too
            box[0] = ("ok", pickle.dumps(result))
        except BaseException as exc:  # noqa: BLE001 - the other ranks must hear about any failure, then we re-raise
            error = exc
            box[0] = ("error", "".join(traceback.format_exception(exc)))
    dist.broadcast_object_list(box, src=src, group=group)
    status, value = box[0]
    if error is not None:
        raise error
    if status == "error":
        raise Rank0DecisionError(f"the decision failed on rank {src}; its traceback:\n{value}")
    return result if dist.get_rank() == src else pickle.loads(value)


def select_on_rank0(select_fn: Callable[..., Any], *args, group=None, src: int = 0, **kwargs) -> torch.Tensor:
    """Run `select_fn(*args, **kwargs)` (returning sample indices) on `src` only; every rank gets the same 1-D
    int64 CPU tensor.

    Two tensor broadcasts: the length, then the values. A failure on `src` (in `select_fn` or in converting its
    result) is signalled with length -1: it re-raises there and raises `Rank0DecisionError` on the other ranks.
    """
    if not _distributed():
        return _as_index_tensor(select_fn(*args, **kwargs))
    _check_src(src, group)
    device = _device(group)
    size = torch.zeros(1, dtype=torch.int64, device=device)
    if dist.get_rank() == src:
        try:
            chosen = _as_index_tensor(select_fn(*args, **kwargs)).to(device)
        except BaseException:
            size.fill_(-1)
            dist.broadcast(size, src=src, group=group)
            raise
        size.fill_(chosen.numel())
        dist.broadcast(size, src=src, group=group)
        if chosen.numel():
            dist.broadcast(chosen, src=src, group=group)
        return chosen.cpu()
    dist.broadcast(size, src=src, group=group)
    n = int(size.item())
    if n < 0:
        raise Rank0DecisionError(f"the index selection failed on rank {src}; see that rank's traceback")
    values = torch.empty(n, dtype=torch.int64, device=device)
    if n:
        dist.broadcast(values, src=src, group=group)
    return values.cpu()


def broadcast_indices(indices: torch.Tensor | Sequence[int] | None, *, group=None, src: int = 0) -> torch.Tensor:
    """Broadcast a 1-D integer index tensor held by `src` (other ranks pass None); returns int64 on CPU."""
    return select_on_rank0(_identity, indices, group=group, src=src)


def _identity(x):
    return x


def _as_index_tensor(indices) -> torch.Tensor:
    t = torch.as_tensor(indices if indices is not None else [])
    if t.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"indices must be integers, got dtype {t.dtype}")
    return t.to(torch.int64)
