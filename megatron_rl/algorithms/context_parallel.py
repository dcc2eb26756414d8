"""Context-parallel (CP) layout of response tokens and the per-sequence reduction GSPO/LUSPO need.

Layout (Megatron-Core's load-balanced CP, `get_batch_on_this_cp_rank`): the (padded) sequence dimension
of length T is cut into 2*cp equal chunks; CP rank r holds chunks r and 2*cp-1-r, concatenated in that
order, so every rank gets T/cp tokens and an equal share of the causal-attention work. The helpers here
apply that layout to any [B, T, ...] tensor (log-probs, masks, advantages), give the global positions
of the local tokens, and invert it.

Reduction: sequence-level losses need, per sequence i, two sums over ALL its tokens: the masked
log-ratio sum sum_t m_it (logp_it - logp_old_it) and the length |y_i| = sum_t m_it. Each CP rank sums
its local tokens and one all-reduce of a [B, 2] tensor over the CP group completes them
(`reduce_sequence_sums`) -- two scalars per sequence instead of all-gathering [B, T] per-token tensors
(tools/bench_cp_reduction.py measures the difference).

Why the losses use the detached reduction (no gradient through the collective): GSPO and LUSPO are
implemented in the GSPO-token form s_it = sg(s_i) * exp(logp_it - sg(logp_it)) (GSPO, arXiv 2507.18071,
eq. for GSPO-token), whose gradient w.r.t. logp_it is s_i times the local token's own term. The reduced
sum enters only through sg(s_i) and the normaliser |y_i|, both constants for autograd, so each CP rank's
local loss already has the exact gradient for its local tokens. `reduce_sequence_sums_differentiable` is
provided for a formulation that does differentiate through s_i (e.g. the literal sequence form
s_i = exp(sum_t m d_it / |y_i|)); the test-suite uses it to cross-check the token form.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "cp_chunk_ranges",
    "cp_local_positions",
    "split_for_cp",
    "merge_cp_parts",
    "gather_from_cp",
    "group_rank",
    "group_size",
    "reduce_sequence_sums",
    "reduce_sequence_sums_differentiable",
]


def group_size(group) -> int:
    """Size of a process group; 1 for `None` meaning "no parallelism" (not the default world group)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank inside `group`; 0 for `None` ("no parallelism")."""
    return 0 if group is None else dist.get_rank(group)


def _check_layout(seq_len: int, cp_size: int, cp_rank: int) -> None:
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")
    if seq_len % (2 * cp_size) != 0:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2*cp_size={2 * cp_size}: pad the response "
            f"dimension to a multiple of {2 * cp_size} (masked padding) before splitting for context parallel"
        )


def cp_chunk_ranges(seq_len: int, cp_size: int, cp_rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two [start, end) ranges of global positions CP rank `cp_rank` holds: chunks r and 2*cp-1-r."""
    _check_layout(seq_len, cp_size, cp_rank)
    chunk = seq_len // (2 * cp_size)
    first, second = cp_rank, 2 * cp_size - 1 - cp_rank
    return (first * chunk, (first + 1) * chunk), (second * chunk, (second + 1) * chunk)


def cp_local_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions (LongTensor [seq_len // cp_size]) of the tokens CP rank `cp_rank` holds, in local order."""
    (a0, a1), (b0, b1) = cp_chunk_ranges(seq_len, cp_size, cp_rank)
    return torch.cat([torch.arange(a0, a1, device=device), torch.arange(b0, b1, device=device)])


def split_for_cp(x: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's part of `x` along `dim` (default: the token dimension of [B, T, ...]).

    cp_size == 1 returns `x` itself. Differentiable (it is indexing).
    """
    if cp_size == 1:
        return x
    (a0, a1), (b0, b1) = cp_chunk_ranges(x.shape[dim], cp_size, cp_rank)
    return torch.cat([x.narrow(dim, a0, a1 - a0), x.narrow(dim, b0, b1 - b0)], dim=dim)


def merge_cp_parts(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of `split_for_cp`: rebuild the full tensor from every CP rank's part (parts[r] from rank r)."""
    cp_size = len(parts)
    if cp_size == 0:
        raise ValueError("merge_cp_parts needs one part per CP rank, got none")
    local_len = parts[0].shape[dim]
    if any(p.shape != parts[0].shape for p in parts):
        raise ValueError(f"all CP parts must have the same shape, got {[tuple(p.shape) for p in parts]}")
    if local_len % 2 != 0:
        raise ValueError(f"a CP part holds two equal chunks, so its length must be even; got {local_len}")
    chunk = local_len // 2
    chunks: list[torch.Tensor | None] = [None] * (2 * cp_size)
    for r, part in enumerate(parts):
        chunks[r] = part.narrow(dim, 0, chunk)
        chunks[2 * cp_size - 1 - r] = part.narrow(dim, chunk, chunk)
    return torch.cat(chunks, dim=dim)


def gather_from_cp(local: torch.Tensor, cp_group, dim: int = 1) -> torch.Tensor:
    """All-gather every CP rank's part and return the full tensor on each rank (no gradient).

    This is the per-token alternative the sequence reduction avoids; it is here for tools, tests and
    debugging (e.g. `tools/bench_cp_reduction.py` times it).
    """
    cp_size = group_size(cp_group)
    if cp_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(cp_size)]
    dist.all_gather(parts, local.contiguous(), group=cp_group)
    return merge_cp_parts(parts, dim=dim)


def reduce_sequence_sums(local_sums: torch.Tensor, cp_group) -> torch.Tensor:
    """Sum per-sequence partial sums over the CP group; forward only (the result is detached).

    local_sums: [B, k] (k = 2 for the losses: masked log-ratio sum and token count) computed on this
    rank's local tokens. Returns the [B, k] totals, identical on every CP rank. One all-reduce of B*k
    elements; with cp_group None (or of size 1) it is just a detached copy.
    """
    totals = local_sums.detach().clone()
    if group_size(cp_group) > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=cp_group)
    return totals


class _AllReduceSum(torch.autograd.Function):
    """y = sum over the group of x_r (same y on every rank); backward all-reduces the incoming gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_y.contiguous().clone()
        dist.all_reduce(grad_x, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_x, None


def reduce_sequence_sums_differentiable(local_sums: torch.Tensor, cp_group) -> torch.Tensor:
    """Like `reduce_sequence_sums`, but differentiable.

    Backward semantics: the objective being differentiated is the SUM over CP ranks of each rank's loss
    (the additive-share contract of `normalization.py`). Every rank's loss depends on the same total
    y = sum_r x_r, so d(sum_r' L_r')/d x_r = sum_r' dL_r'/dy: the backward all-reduces (sums) the
    incoming gradient over the CP group. Every CP rank must therefore call backward (it is a collective).
    """
    if group_size(cp_group) == 1:
        return local_sums
    return _AllReduceSum.apply(local_sums, cp_group)
