"""The actor's weights as a vLLM `WeightSource` split by owner (vllm.distributed.weight_transfer.base, vLLM 0.32).

Each owner (the rank that sends a tensor: the first DP replica's TP/ETP rank 0 of the PP stage or EP group holding
it, see models/weight_transfer.owner_plan) produces only its own share, bucket by bucket, with bounded memory; no
rank gathers the whole model. vLLM's contract, as its `WeightSource` docstring states it:
- `metadata()` describes the WHOLE model on every rank (name, dtype, full HF shape), in iteration order;
- `held_names()` is this rank's share; every name has exactly one owner (checked when the plan is built);
- iteration covers this rank's gather groups (`groups()`) in metadata order, the tensor where held and None
  elsewhere; collective (the owner's TP/ETP peers gather with it), so every rank must iterate.
`buckets()` is the same stream as whole buckets of the owner's tensors, which is what our senders put on the wire
(rollout/weight_transport.py, `GlooSender`).
"""
from __future__ import annotations

from typing import Iterator

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

from megatron_rl.models.qwen_arch import QwenArch
from megatron_rl.models.weight_transfer import owned_hf_buckets, owner_plan


class MegatronWeightSource(WeightSource):
    """This rank's share of a live, sharded Megatron model (`chunks`: its model chunks, unwrapped). Building one is
    collective (the plan: one exchange of the ranks' parameter tables); build it once per model and layout."""

    def __init__(self, chunks: list, arch: QwenArch, *, bucket_bytes: int = 256 * 1024**2):
        import torch.distributed as dist

        self._chunks, self._arch = chunks, arch
        self.bucket_bytes = bucket_bytes
        self.plan = owner_plan(chunks, arch, bucket_bytes=bucket_bytes)
        self.rank = dist.get_rank()

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, dtype, shape) for name, shape, dtype, _ in self.plan.tensors]

    def held_names(self) -> list[str]:
        return [name for name, _, _, owner in self.plan.tensors if owner == self.rank]

    def owners(self) -> dict[str, int]:
        """HF name -> the global rank that sends it."""
        return {name: owner for name, _, _, owner in self.plan.tensors}

    def buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Collective: one yield per bucket of the model on every rank, this rank's (hf_name, tensor) pairs where it
        owns the bucket, [] elsewhere (models/weight_transfer.owned_hf_buckets)."""
        return owned_hf_buckets(self._chunks, self._arch, self.plan)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        wanted = {name for group in self.groups() for name in group}
        for entries, bucket in zip(self.plan.buckets, self.buckets()):
            tensors = dict(bucket)
            for canonical, *_ in entries:
                for name in self.plan.hf_names[canonical]:
                    if name in wanted:
                        yield name, tensors.get(name)
