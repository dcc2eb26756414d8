"""Token balancing and the index arithmetic of packed (THD) sequences under context parallelism. Pure functions.

Packed layout: sequences are padded to `pad_multiple` (2*cp, so each splits into 2*cp equal chunks) and
concatenated into one stream; `cu_seqlens` are the cumulative padded lengths. Under CP, rank r holds, for every
sequence in order, its chunks r and 2*cp-1-r (TE's THD CP layout; Megatron's THD RoPE assumes the same).
"""
from __future__ import annotations

import heapq
from typing import Sequence

import torch


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def balanced_partition(weights: Sequence[int], num_bins: int) -> list[list[int]]:
    """Split item indices into `num_bins` bins with near-equal weight sums (greedy LPT: heaviest item first into
    the lightest bin; ties by index, so the result is deterministic on every rank). Bins list indices ascending.

    LPT is within 4/3 of the optimal makespan (Graham 1969), plenty for balancing tokens across DP ranks
    and micro-batches.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    heap = [(0, b) for b in range(num_bins)]
    for index in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, b = heapq.heappop(heap)
        bins[b].append(index)
        heapq.heappush(heap, (load + weights[index], b))
    return [sorted(b) for b in bins]


def thd_cp_local_index(padded_lengths: Sequence[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """Indices, into the packed global stream, of the tokens CP rank `cp_rank` holds (in its local order)."""
    if cp_size == 1:
        return torch.arange(sum(padded_lengths))
    pieces, start = [], 0
    for n in padded_lengths:
        if n % (2 * cp_size):
            raise ValueError(f"packed length {n} is not a multiple of 2*cp={2 * cp_size}")
        chunk = n // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
        start += n
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
