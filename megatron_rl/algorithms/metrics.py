"""Loss metrics kept as (sum, count) pairs so that micro-batches and ranks combine exactly.

A mean over the whole step is sum(sums) / sum(counts), whatever the DP / CP / micro-batch split, as long
as each item (token or sequence) is counted by exactly one (micro-batch, rank). The losses guarantee that:
token metrics are counted by the rank holding the token; sequence metrics (the same on every CP rank
after the CP reduction) are counted by CP rank 0 only, and contribute (0, 0) elsewhere.

    step = LossMetrics()
    for mb in micro_batches:
        loss, m = policy_loss_share(...); step.merge(m)
    step = step.reduce(dp_group, cp_group)        # collective: every rank, same metric names
    log(step.means())
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rl.algorithms.context_parallel import group_size

__all__ = ["LossMetrics"]


class LossMetrics:
    """A mapping name -> (sum, count) of float64 tensors (detached)."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}

    def add(self, name: str, values_sum, count) -> "LossMetrics":
        """Add `values_sum` to the metric's sum and `count` to its count (creating it at (0, 0))."""
        values_sum = torch.as_tensor(values_sum).detach().to(torch.float64)
        count = torch.as_tensor(count, device=values_sum.device).detach().to(torch.float64)
        if name in self._sums:
            self._sums[name] = self._sums[name] + values_sum
            self._counts[name] = self._counts[name] + count
        else:
            self._sums[name], self._counts[name] = values_sum, count
        return self

    def merge(self, other: "LossMetrics") -> "LossMetrics":
        """Accumulate another micro-batch's metrics into this one (in place); returns self."""
        for name in other._sums:
            self.add(name, other._sums[name], other._counts[name])
        return self

    def names(self) -> list[str]:
        return sorted(self._sums)

    def pair(self, name: str) -> tuple[float, float]:
        """(sum, count) of one metric as Python floats."""
        return float(self._sums[name]), float(self._counts[name])

    def reduce(self, *groups) -> "LossMetrics":
        """A new LossMetrics with sums and counts all-reduced (summed) over each group in turn.

        Pass the DP and CP groups (or one DP x CP group); None entries are skipped. Collective: every rank
        of the groups must call it with the same metric names (the losses emit a fixed set of names that
        depends only on their options, never on the data). One all-reduce of 2 * len(names) values per group.
        """
        names = self.names()
        out = LossMetrics()
        if not names:
            return out
        packed = torch.stack([self._sums[n] for n in names] + [self._counts[n] for n in names])
        for group in groups:
            if group_size(group) > 1:
                dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        for k, name in enumerate(names):
            out.add(name, packed[k], packed[len(names) + k])
        return out

    def means(self) -> dict[str, float]:
        """name -> sum / count (NaN for a metric that counted nothing, e.g. entropy of an all-empty batch)."""
        return {
            n: (float(self._sums[n]) / float(self._counts[n])) if float(self._counts[n]) > 0 else float("nan")
            for n in self.names()
        }

    def __repr__(self) -> str:
        return f"LossMetrics({self.means()})"
