"""Megatron's unfused THD RoPE with its frequencies gathered by one index instead of one slice per sequence.

megatron-core 0.16.1's `rope_utils._apply_rotary_pos_emb_thd` (the packed-sequence RoPE wherever Transformer Engine's
fused RoPE is not used: CPU, GPUs without TE, `apply_rope_fusion=False`) builds the packed frequency tensor in a
Python loop: `torch.split` of the input into its sequences, a slice of `freqs` per sequence (two under context
parallelism), then one `torch.cat`. That is ~2 torch calls per sequence, for q and again for k, in every layer and
micro-batch: ~2,000 per RL step of the CPU quickstart (256 sequences per micro-batch), each also paying the CPU
literal-CUDA mode (parallel/cpu_compat.py). On a GPU each is a host-side call too.

`packed_rope_positions` computes every token's rotary position at once, the positions that loop slices (CP's
load-balanced chunks r and 2*cp-1-r of each sequence included, and the offset mapping Megatron uses when `freqs`
covers every packed position). `freqs[positions]` is then the loop's tensor element for element, and the rotation
itself is still Megatron's `_apply_rotary_pos_emb_bshd` on it, so outputs and gradients are identical bit for bit
(tests/unit/parallel/test_thd_rope.py). Anything the loop would refuse (a length that does not split as it expects)
goes to Megatron's own function, which raises as before.
"""
from __future__ import annotations

import torch

_MARK = "_megatron_rl_packed_positions"


def packed_rope_positions(cu_seqlens: torch.Tensor, cp_size: int = 1, cp_rank: int = 0, *,
                          with_offsets: bool = False) -> torch.Tensor:
    """Rotary position of every token this CP rank holds of a packed (THD) batch, in its local order (LongTensor).

    cu_seqlens: the global, padded sequence boundaries (as Megatron's THD RoPE takes them); each sequence's local part
    is its length // cp_size tokens. Under CP a local part is two equal chunks: global chunk cp_rank and chunk
    2*cp_size-1-cp_rank of the sequence. with_offsets: add each sequence's start in the packed batch (Megatron's
    mapping when `freqs` holds one row per packed position)."""
    cu = cu_seqlens.to(torch.long)
    full = cu[1:] - cu[:-1]
    local = torch.div(full, cp_size, rounding_mode="floor")
    sequence = torch.repeat_interleave(torch.arange(local.numel(), device=cu.device), local)
    starts = torch.cumsum(local, 0) - local
    position = torch.arange(sequence.numel(), device=cu.device) - starts[sequence]
    if cp_size > 1:
        chunk = torch.div(local, 2, rounding_mode="floor")[sequence]
        length = (local * cp_size)[sequence]
        position = torch.where(position < chunk, cp_rank * chunk + position,
                               length - (cp_rank + 1) * chunk + (position - chunk))
    if with_offsets:
        position = position + cu[:-1][sequence]
    return position


def _splits_as_megatron_expects(t: torch.Tensor, cu_seqlens: torch.Tensor, cp_size: int) -> bool:
    """Whether Megatron's loop would run: the local lengths add up to t's tokens and, under CP, each is two equal
    chunks."""
    local = torch.div(cu_seqlens[1:] - cu_seqlens[:-1], cp_size, rounding_mode="floor")
    if int(local.sum()) != t.size(0):
        return False
    return cp_size == 1 or not bool((local % 2).any())


def use_packed_rope_positions() -> None:
    """Replace `rope_utils._apply_rotary_pos_emb_thd` in this process (idempotent)."""
    from megatron.core.models.common.embeddings import rope_utils

    if getattr(rope_utils._apply_rotary_pos_emb_thd, _MARK, False):
        return
    megatron_thd = rope_utils._apply_rotary_pos_emb_thd

    def apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, rotary_interleaved=False, multi_latent_attention=False,
                                 mscale=1.0, cp_group=None):
        kwargs = dict(rotary_interleaved=rotary_interleaved, multi_latent_attention=multi_latent_attention,
                      mscale=mscale, cp_group=cp_group)
        if cp_group is None or not _splits_as_megatron_expects(t, cu_seqlens, cp_group.size()):
            return megatron_thd(t, cu_seqlens, freqs, **kwargs)  # raises as it always did
        exact = freqs.dim() >= 1 and freqs.size(0) == cu_seqlens[-1]
        positions = packed_rope_positions(cu_seqlens, cp_group.size(), cp_group.rank(), with_offsets=bool(exact))
        return rope_utils._apply_rotary_pos_emb_bshd(
            t.unsqueeze(1), freqs[positions], rotary_interleaved=rotary_interleaved,
            multi_latent_attention=multi_latent_attention, mscale=mscale,
        ).squeeze(1)

    setattr(apply_rotary_pos_emb_thd, _MARK, True)
    apply_rotary_pos_emb_thd.__wrapped__ = megatron_thd
    apply_rotary_pos_emb_thd.__doc__ = megatron_thd.__doc__
    rope_utils._apply_rotary_pos_emb_thd = apply_rotary_pos_emb_thd
