"""Core attention in plain torch (SDPA) for Megatron's local layer spec, with packed sequences and context parallelism.

megatron-core's local `DotProductAttention` refuses both packed (THD) sequences and context parallelism ("only
supported by TEDotProductAttention"). Where Transformer Engine is absent (CPU, and GPUs without TE) this module
replaces it (`megatron_rl.models.builder.block_spec`), so the actor packs sequences and uses CP everywhere:

- bshd, no CP: causal SDPA on [b, heads, s, d].
- bshd, CP: K/V are all-gathered over the CP group (autograd-aware); the causal mask is built from *global*
  positions of Megatron's load-balanced layout (rank r holds chunks r and 2*cp-1-r of 2*cp chunks).
- thd (packed): `cu_seqlens` (padded, global, as TE takes them) delimit sequences; each sequence attends causally
  within itself only. Without CP, sequences of similar length are batched into one padded SDPA call
  (`packed_causal_attention`), so an RL pack of many short responses costs a few calls, not one per sequence. With CP each sequence is itself split into 2*cp chunks per rank (TE's THD CP layout,
  which Megatron's THD RoPE also assumes), and the mask uses global positions inside each sequence.
GQA is handled by SDPA's `enable_gqa`. The math is the same as Megatron's: softmax(q k^T * scale) v.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_rl.algorithms.context_parallel import cp_local_positions


class _AllGatherAlongFirstDim(torch.autograd.Function):
    """Forward: concatenate every rank's tensor along dim 0 (rank order). Backward: the gradient of this rank's
    slice is the sum over ranks of their gradients for it (all-reduce, then take own slice)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        size = torch.distributed.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=group)
        size, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        return grad.chunk(size, dim=0)[rank].contiguous(), None


def all_gather_cp(x: torch.Tensor, group) -> torch.Tensor:
    return _AllGatherAlongFirstDim.apply(x, group)


def _sdpa(q, k, v, scale, *, causal: bool = False, allowed: torch.Tensor | None = None):
    """q [b, hq, sq, d], k/v [b, hkv, sk, d] -> [b, hq, sq, d]."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=causal, scale=scale, enable_gqa=gqa)


class TorchCoreAttention(torch.nn.Module):
    """Drop-in `core_attention` for megatron-core's local spec (same constructor and forward signature)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        from megatron.core import parallel_state

        self.config = config
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) > 0:
            raise ValueError("TorchCoreAttention does not implement attention dropout (RL fine-tuning uses 0)")
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.cp_group = cp_group if cp_group is not None else parallel_state.get_context_parallel_group()
        self.cp_size = torch.distributed.get_world_size(self.cp_group)
        self.cp_rank = torch.distributed.get_rank(self.cp_group)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("TorchCoreAttention does not support attention_bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            return self._forward_thd(query, key, value, cu)
        return self._forward_bshd(query, key, value, attention_mask)

    # [s, b, h, d] layout ---------------------------------------------------------------------------------
    def _forward_bshd(self, query, key, value, attention_mask):
        sq, b, hq, d = query.shape
        q = query.permute(1, 2, 0, 3)
        if self.cp_size == 1:
            k, v = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)
            if attention_mask is None:
                out = _sdpa(q, k, v, self.scale, causal=True)
            else:  # Megatron masks are True where attention is NOT allowed
                out = _sdpa(q, k, v, self.scale, allowed=~attention_mask.bool())
        else:
            if attention_mask is not None:
                raise ValueError("context parallelism with an explicit attention mask is not supported")
            k = all_gather_cp(key, self.cp_group).permute(1, 2, 0, 3)
            v = all_gather_cp(value, self.cp_group).permute(1, 2, 0, 3)
            seq = sq * self.cp_size
            q_pos = cp_local_positions(seq, self.cp_size, self.cp_rank, device=query.device)
            k_pos = torch.cat([cp_local_positions(seq, self.cp_size, r, device=query.device) for r in range(self.cp_size)])
            out = _sdpa(q, k, v, self.scale, allowed=q_pos[:, None] >= k_pos[None, :])
        return out.permute(2, 0, 1, 3).reshape(sq, b, hq * d)

    # [t, h, d] packed layout -----------------------------------------------------------------------------
    def _forward_thd(self, query, key, value, cu_seqlens):
        t, hq, d = query.shape
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        cp = self.cp_size
        if any(n % (2 * cp) for n in lengths if cp > 1):
            raise ValueError(f"packed sequence lengths {lengths} must be multiples of 2*cp={2 * cp}")
        local_lengths = [n // cp for n in lengths]
        if sum(local_lengths) != t:
            raise ValueError(f"packed sequences hold {sum(local_lengths)} local tokens but the input has {t}")
        if cp == 1:
            return packed_causal_attention(query, key, value, lengths, self.scale).reshape(t, hq * d)
        # One split per tensor, not a slice per sequence: the backward of N basic slices would zero-fill and add N
        # full-size [t, heads, d] gradients (O(N x t) per layer); split's backward concatenates once (O(t)).
        queries = query.split(local_lengths)
        # every rank's local tokens, per sequence: [cp, n_local, heads, d]
        gathered_k = all_gather_cp(key, self.cp_group).view(cp, t, *key.shape[1:])
        gathered_v = all_gather_cp(value, self.cp_group).view(cp, t, *value.shape[1:])
        keys, values = gathered_k.split(local_lengths, dim=1), gathered_v.split(local_lengths, dim=1)
        outputs = []
        for n, q, k, v in zip(lengths, queries, keys, values):
            if q.shape[0] == 0:
                continue
            q = q.permute(1, 0, 2).unsqueeze(0)
            k = k.reshape(-1, *key.shape[1:]).permute(1, 0, 2).unsqueeze(0)
            v = v.reshape(-1, *value.shape[1:]).permute(1, 0, 2).unsqueeze(0)
            q_pos = cp_local_positions(n, cp, self.cp_rank, device=query.device)
            k_pos = torch.cat([cp_local_positions(n, cp, r, device=query.device) for r in range(cp)])
            out = _sdpa(q, k, v, self.scale, allowed=q_pos[:, None] >= k_pos[None, :])
            outputs.append(out.squeeze(0).permute(1, 0, 2))
        return torch.cat(outputs, dim=0).reshape(t, hq * d)


def length_buckets(lengths: list[int], max_padded_per_real: float = 2.0) -> list[list[int]]:
    """Group the non-empty sequences of a pack so each group can run as ONE padded attention call.

    Sequences are taken longest first; a group is closed when padding all its members to its longest one would
    exceed `max_padded_per_real` x its real tokens. Returns lists of indices into `lengths` (each group's first
    index is its longest sequence); every sequence with length > 0 is in exactly one group.
    """
    if max_padded_per_real < 1:
        raise ValueError(f"max_padded_per_real must be >= 1, got {max_padded_per_real}")
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > max_padded_per_real * (real + lengths[i]):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        groups.append(current)
    return groups


def packed_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[int],
                            scale: float) -> torch.Tensor:
    """Causal attention within each sequence of a pack (no CP): query [t, hq, d], key/value [t, hkv, d], where
    consecutive runs of `lengths` tokens are independent sequences. Returns [t, hq, d].

    Instead of one SDPA call per sequence (slow for RL batches of many short responses), sequences of similar length
    (`length_buckets`) are gathered into a padded [group, hq, longest, d] batch and run as one causal call. Padding
    sits after each sequence's real tokens, so the causal mask already hides it from every real query; padded query
    rows are computed and dropped. Each token goes through exactly one call, so values and gradients equal the
    per-sequence computation (up to float summation order inside SDPA).
    """
    t = query.shape[0]
    if sum(lengths) != t:
        raise ValueError(f"packed sequence lengths sum to {sum(lengths)} but the input has {t} tokens")
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    groups = length_buckets(lengths)
    if len(groups) == 1 and len(set(lengths)) == 1:  # equal lengths: a plain reshape, no gather
        b, n = len(lengths), lengths[0]
        q, k, v = (x.reshape(b, n, *x.shape[1:]).transpose(1, 2) for x in (query, key, value))
        return _sdpa(q, k, v, scale, causal=True).transpose(1, 2).reshape(query.shape)
    outputs, token_index = [], []
    for group in groups:
        longest = lengths[group[0]]
        offsets = torch.arange(longest, device=query.device)
        group_starts = torch.tensor([starts[i] for i in group], device=query.device)
        group_lengths = torch.tensor([lengths[i] for i in group], device=query.device)
        real = offsets[None, :] < group_lengths[:, None]  # [group, longest]
        index = torch.where(real, group_starts[:, None] + offsets[None, :], 0)  # padding reads token 0, then dropped
        q, k, v = (x[index].transpose(1, 2) for x in (query, key, value))  # [group, heads, longest, d]
        out = _sdpa(q, k, v, scale, causal=True).transpose(1, 2)  # [group, longest, hq, d]
        outputs.append(out[real])
        token_index.append(index[real])
    return torch.cat(outputs)[torch.argsort(torch.cat(token_index))]
