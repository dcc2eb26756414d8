"""Move weights between HF tensors and a live, sharded Megatron model (any TP x PP x EP x ETP x VPP x DP).

- `load_hf_weights(chunks, arch, reader)`: every rank reads only the HF tensors its shards need and copies
  its slice in. Every local parameter must be covered, or it raises (no parameter is left at random init).
- `export_hf_weights(chunks, arch, bucket_bytes=..., dst=None)`: a generator of buckets of full, HF-named
  tensors. Collective: every rank of the world must iterate it. TP/ETP shards are all-gathered inside their
  groups; each full tensor then travels once from its owner (the lowest global rank holding it) to every rank
  (`dst=None`) or to one rank (`dst=r`; other ranks get empty buckets but must still iterate). Buckets are
  bounded by `bucket_bytes`, so peak extra memory is about one bucket, whatever the model size.
- `owner_plan(chunks, arch, bucket_bytes=...)` + `owned_hf_buckets(chunks, arch, plan)`: the same tensors split by
  owner (PP stage, EP group): no tensor crosses to another rank except inside its TP/ETP group; each owner gets its
  own buckets (bounded by `bucket_bytes`). What owner sends to the engines use (actor/weight_source.py, a vLLM
  `WeightSource`; docs/rollout.md, "Weight sync").
Used by weight sync (trainer -> vLLM engines), HF export/conversion and the parity checks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_rl.models.hf_io import HFCheckpointReader
from megatron_rl.models.qwen_arch import QwenArch
from megatron_rl.models.weight_mapping import (
    TensorMapping,
    canonical_name,
    hf_to_megatron,
    is_expert_param,
    is_glu_param,
    mappings_by_megatron_name,
    megatron_to_hf,
    shard_for_rank,
    tp_partition_dim,
    unshard,
)

TIED_OUTPUT = "output_layer.weight"
EMBEDDING = "embedding.word_embeddings.weight"


@dataclass
class LocalParam:
    canonical: str
    param: torch.nn.Parameter
    tp_dim: int | None
    glu: bool
    expert: bool


def _layer_offsets(chunk) -> dict[int, int]:
    layers = getattr(getattr(chunk, "decoder", None), "layers", [])
    return {i: layer.layer_number - 1 for i, layer in enumerate(layers)}


def local_params(chunks: list, arch: QwenArch) -> list[LocalParam]:
    """This rank's parameters with their canonical names and sharding (TE extra states are not parameters)."""
    from megatron.core import parallel_state as ps

    expert_offset = 0
    if arch.moe is not None:
        expert_offset = ps.get_expert_model_parallel_rank() * (arch.moe.num_experts // ps.get_expert_model_parallel_world_size())
    out = []
    for chunk in chunks:
        offsets = _layer_offsets(chunk)
        for name, param in chunk.named_parameters():
            canonical = canonical_name(name.removeprefix("module."), offsets, expert_offset)
            out.append(
                LocalParam(canonical, param, tp_partition_dim(param), is_glu_param(canonical), is_expert_param(canonical))
            )
    return out


def _tp_group_of(item: LocalParam):
    from megatron.core import parallel_state as ps

    return ps.get_expert_tensor_parallel_group() if item.expert else ps.get_tensor_model_parallel_group()


def _mapping_for(canonical: str, by_name: dict[str, TensorMapping], arch: QwenArch) -> TensorMapping:
    if canonical == TIED_OUTPUT and arch.tie_word_embeddings:
        return by_name[EMBEDDING]
    if canonical not in by_name:
        raise KeyError(f"Megatron parameter '{canonical}' has no HF counterpart for {arch.model_type}")
    return by_name[canonical]


@torch.no_grad()
def load_hf_weights(chunks: list, arch: QwenArch, reader: HFCheckpointReader) -> int:
    """Copy HF weights into this rank's Megatron shards; returns the number of parameters filled."""
    by_name = mappings_by_megatron_name(arch)
    filled = 0
    for item in local_params(chunks, arch):
        mapping = _mapping_for(item.canonical, by_name, arch)
        full = hf_to_megatron(mapping, [reader.get(n) for n in mapping.hf_names], arch)
        group = _tp_group_of(item)
        local = shard_for_rank(full, item.tp_dim, item.glu, dist.get_rank(group), dist.get_world_size(group))
        if tuple(local.shape) != tuple(item.param.shape):
            raise ValueError(
                f"shape mismatch loading '{item.canonical}' from {mapping.hf_names}: shard {tuple(local.shape)} "
                f"vs parameter {tuple(item.param.shape)}"
            )
        item.param.copy_(local.to(item.param.dtype))
        filled += 1
    return filled


def _gather_full(item: LocalParam) -> torch.Tensor:
    group = _tp_group_of(item)
    size = dist.get_world_size(group)
    local = item.param.detach()
    if item.tp_dim is None or size == 1:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return unshard(parts, item.tp_dim, item.glu)


@dataclass(frozen=True)
class _ExportPlan:
    order: list[tuple[str, tuple[int, ...], torch.dtype, int]]  # (canonical, full shape, dtype, owner rank)


def _full_shape(item: LocalParam, tp_size: int) -> tuple[int, ...]:
    shape = list(item.param.shape)
    if item.tp_dim is not None:
        shape[item.tp_dim] *= tp_size
    return tuple(shape)


def _export_plan(items: list[LocalParam], arch: QwenArch) -> _ExportPlan:
    mine = {
        it.canonical: (_full_shape(it, dist.get_world_size(_tp_group_of(it))), it.param.dtype)
        for it in items
        if not (it.canonical == TIED_OUTPUT and arch.tie_word_embeddings)
    }
    everyone: list[dict] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {k: (s, str(d)) for k, (s, d) in mine.items()})
    owner: dict[str, tuple[int, tuple[int, ...], str]] = {}
    for r, table in enumerate(everyone):
        for name, (shape, dtype) in table.items():
            owner.setdefault(name, (r, tuple(shape), dtype))
    order = []
    for mapping_name in mappings_by_megatron_name(arch):
        if mapping_name not in owner:
            raise RuntimeError(f"no rank holds '{mapping_name}': the model is missing a parameter")
        r, shape, dtype = owner[mapping_name]
        order.append((mapping_name, shape, getattr(torch, dtype.removeprefix("torch.")), r))
    return _ExportPlan(order)


def _buckets(order, bucket_bytes: int, *, one_owner: bool = False):
    """Consecutive plan entries, at most bucket_bytes each (a larger tensor alone); one_owner: a new bucket also
    starts where the owner changes (every bucket then comes from one rank)."""
    bucket, size = [], 0
    for entry in order:
        nbytes = torch.Size(entry[1]).numel() * torch.empty((), dtype=entry[2]).element_size()
        if bucket and (size + nbytes > bucket_bytes or (one_owner and entry[3] != bucket[-1][3])):
            yield bucket
            bucket, size = [], 0
        bucket.append(entry)
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def export_hf_weights(
    chunks: list, arch: QwenArch, *, bucket_bytes: int = 256 * 1024**2, dst: int | None = None,
    host_copies: bool = True,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of (hf_name, full tensor). Collective over the default group: all ranks must iterate.
    host_copies: each tensor its own host tensor (conversion, the host-memory transports); False: views of the
    received buffers on the process group's device (the GPU under NCCL), valid until the next bucket is asked for
    (the ipc transport packs them straight into its shared buffer)."""
    items = local_params(chunks, arch)
    by_canonical = {it.canonical: it for it in items}
    by_name = mappings_by_megatron_name(arch)
    plan = _export_plan(items, arch)
    rank = dist.get_rank()
    for bucket in _buckets(plan.order, bucket_bytes):
        # Phase 1: TP/ETP gathers (all members of a TP group hold the same names and walk them in plan order).
        full: dict[str, torch.Tensor] = {}
        for name, _, _, _ in bucket:
            if name in by_canonical:
                full[name] = _gather_full(by_canonical[name])
        # Phase 2: one flat transfer per owner rank in this bucket.
        owners = sorted({owner for *_, owner in bucket})
        received: dict[str, torch.Tensor] = {}
        for owner in owners:
            entries = [(n, s, d) for n, s, d, o in bucket if o == owner]
            dtype = entries[0][2]
            if any(d != dtype for _, _, d in entries):
                groups = [[e] for e in entries]  # mixed dtypes: one transfer per tensor
            else:
                groups = [entries]
            for group in groups:
                received.update(_transfer(group, owner, full, rank, dst, host_copies))
        if dst is None or rank == dst:
            out = []
            for name, *_ in bucket:
                out.extend(megatron_to_hf(by_name[name], received[name], arch))
            yield out
        else:
            yield []


def _transfer(entries, owner: int, full: dict[str, torch.Tensor], rank: int, dst: int | None,
              host_copies: bool = True) -> dict[str, torch.Tensor]:
    """Move one owner's tensors (flattened into one buffer) to every rank (dst None) or to rank dst.

    The buffer lives where the process group can send it (the current GPU under NCCL); received tensors are
    returned as host tensors of their own (host_copies), which is where conversion and the host-memory transports
    consume them, or as views of that buffer."""
    numels = [torch.Size(s).numel() for _, s, _ in entries]
    dtype = entries[0][2]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if rank == owner:
        flat = torch.cat([full[n].reshape(-1).to(device=device, dtype=dtype) for n, _, _ in entries])
    elif dst is None or rank == dst:
        flat = torch.empty(sum(numels), dtype=dtype, device=device)
    else:
        return {}
    if dst is None:
        if dist.get_world_size() > 1:
            dist.broadcast(flat, src=owner)
    elif owner != dst:
        if rank == owner:
            dist.send(flat, dst=dst)
            return {}
        dist.recv(flat, src=owner)
    elif rank != dst:
        return {}
    pieces = zip(entries, torch.split(flat.cpu() if host_copies else flat, numels))
    return {name: piece.view(shape).clone() if host_copies else piece.view(shape) for (name, shape, _), piece in pieces}


@dataclass(frozen=True)
class OwnerPlan:
    """Who sends what in owner sends (`owner_plan`): every HF tensor of the model with its owner, and the buckets
    (plan entries: canonical name, full shape, dtype, owner), each from one owner, in the same order."""

    tensors: list[tuple[str, tuple[int, ...], torch.dtype, int]]  # (hf_name, shape, dtype, owner rank)
    buckets: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]]
    hf_names: dict[str, list[str]]  # canonical name -> its HF names


def owner_plan(chunks: list, arch: QwenArch, *, bucket_bytes: int) -> OwnerPlan:
    """Collective (one exchange of every rank's parameter table): the owner plan of this model and layout. The owner
    of a tensor is the lowest global rank holding it: the first DP replica's TP/ETP rank 0 of the PP stage / EP group
    that has it. Shapes of the HF tensors are computed on the meta device (no data moves)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    by_name = mappings_by_megatron_name(arch)
    plan = _export_plan(local_params(chunks, arch), arch)
    tensors, hf_names = [], {}
    for name, shape, dtype, owner in plan.order:
        parts = megatron_to_hf(by_name[name], torch.empty(shape, dtype=dtype, device="meta"), arch)
        hf_names[name] = [hf for hf, _ in parts]
        tensors.extend((hf, tuple(t.shape), dtype, owner) for hf, t in parts)
    return OwnerPlan(tensors, list(_buckets(plan.order, bucket_bytes, one_owner=True)), hf_names)


@torch.no_grad()
def owned_hf_buckets(chunks: list, arch: QwenArch, plan: OwnerPlan) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Collective: one yield per bucket of `plan` on every rank: the bucket's (hf_name, full tensor) pairs on its
    owner, an empty list elsewhere. Only the owner's TP/ETP group works on a bucket (gathers of its shards); no
    tensor goes to another rank, so no rank ever holds more than one bucket of the model beyond its own shards."""
    by_canonical = {it.canonical: it for it in local_params(chunks, arch)}
    by_name = mappings_by_megatron_name(arch)
    rank = dist.get_rank()
    for bucket in plan.buckets:
        owner = bucket[0][3]
        full = {}
        for name, *_ in bucket:
            item = by_canonical.get(name)
            if item is None:
                continue
            group = _tp_group_of(item)
            sharded = item.tp_dim is not None and dist.get_world_size(group) > 1
            if rank == owner or (sharded and owner in dist.get_process_group_ranks(group)):
                full[name] = _gather_full(item)
        if rank != owner:
            yield []
            continue
        out = []
        for name, *_ in bucket:
            out.extend(megatron_to_hf(by_name[name], full.pop(name), arch))
        yield out
