"""THE loss-normalisation contract (the one place it is written down; the README links here).

Notation: one optimizer step trains on N sequences (rows) y_i with response masks m_it; |y_i| = sum_t m_it;
N_tok = sum_i |y_i|; L_max is a constant length (Dr.GRPO's normaliser); l_it is the per-token loss
(clipped surrogate, plus KL and entropy terms when enabled).

1. Full-batch loss. Every policy loss is a weighted token sum
       J = sum_i sum_t  m_it * c_i * l_it
   whose weight c_i is fixed by the loss's aggregation mode (`AGGREGATIONS`):
       "token-mean"               c_i = 1 / N_tok              (DAPO, arXiv 2503.14476, eq. 8; PPO)
       "seq-mean-token-mean"      c_i = 1 / (N * |y_i|)        (GRPO, arXiv 2402.03300, eq. 3; GSPO)
       "seq-mean-token-sum"       c_i = 1 / N                  (LUSPO, arXiv 2602.05261)
       "seq-mean-token-sum-norm"  c_i = 1 / (N * L_max)        (Dr.GRPO, arXiv 2503.20783, sec. 3.2)
   A sequence with |y_i| = 0 contributes 0 (its c_i is defined as 0; never 0/0).
   Which rows N counts is an option (`exclude_fully_masked`, config `actor.loss.exclude_fully_masked`):
       False (default)  N = every row of the step, fully masked ones included (what every measured result used);
       True             N = rows with at least one unmasked token, |y_i| > 0 over the WHOLE sequence (all its CP
                        chunks): a fully masked row (e.g. a truncated response under DAPO's overlong masking,
                        arXiv 2503.14476 sec. 3.4) then neither adds terms nor dilutes the mean, as in verl's
                        seq-mean modes (`agg_loss`: `seq_mask = loss_mask.sum(-1) > 0`).
   It only changes the three seq-mean aggregations; "token-mean" never counted empty rows (they have no tokens).

2. Global counts. N, N_tok and L_max are counted ONCE per optimizer step over all micro-batches and all
   DP x CP ranks: `GlobalBatchCounts.from_masks(local_masks_of_all_micro_batches, dp_group=, cp_group=)`.
   Every rank then holds the same counts. With `exclude_fully_masked=True` "fully masked" is decided on whole
   sequences: each row's local token count is summed over the CP group by the same two-scalars-per-sequence
   reduction the losses use (`context_parallel.reduce_sequence_sums`), inside `from_masks`, once per step.
   Per-sequence quantities (|y_i| for GRPO's token mean, the
   log-ratio sum for GSPO/LUSPO's sequence ratio) are completed per micro-batch inside the loss by one
   CP all-reduce of two scalars per sequence (`context_parallel.reduce_sequence_sums`).

3. Additive shares. For a micro-batch the loss returns
       share = sum over the LOCAL tokens of this micro-batch (this DP rank's rows, this CP rank's chunks)
               of m_it * c_i * l_it,
   with c_i built from the global counts. Hence
       sum over micro-batches, DP ranks and CP ranks of share == J        (value)
       the same sum of d share / d theta                  == dJ/d theta  (gradient),
   exactly up to float rounding, whatever the DP size, CP size or number of micro-batches
   (tests/distributed/test_loss_invariance.py proves it for every registered loss).

4. What the consumer (the Megatron actor) must do with a share:
   - call backward on it as is: do NOT divide by the number of micro-batches, the DP size or the CP size;
   - make the DP(xCP) gradient all-reduce a SUM, not an average;
   - report the step's loss as the all-reduced SUM of the shares (not a mean).
   In megatron-core 0.16 that is `TransformerConfig.calculate_per_token_loss=True` (DDP then uses gradient
   scaling 1.0 and the schedule skips `/ num_microbatches` when the loss function returns a 3-tuple) together
   with a `finalize_model_grads_func` that does not rescale by `num_tokens` (pass num_tokens=None), since the
   share already carries its normaliser.

Groups: `None` means "this dimension is not parallel" (size 1), never "the default world group".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_rl.algorithms.context_parallel import group_rank, group_size, reduce_sequence_sums
from megatron_rl.algorithms.validation import as_bool_mask

__all__ = ["AGGREGATIONS", "GlobalBatchCounts", "token_weights"]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class GlobalBatchCounts:
    """Counts of one optimizer step's whole batch (all micro-batches, all DP x CP ranks); same on every rank.

    num_sequences: the number of rows (responses), each counted once even when CP splits it.
    num_tokens: N_tok, the number of valid (mask = 1) response tokens.
    max_response_length: L_max, Dr.GRPO's constant normaliser (the generation length limit).
    num_nonempty_sequences: rows with at least one valid token over the whole sequence; None = not counted
        (it is counted when exclude_fully_masked is True).
    exclude_fully_masked: which rows the seq-mean aggregations divide by (module docstring, item 1):
        False = all rows (num_sequences), True = the non-empty ones (num_nonempty_sequences).
    `sequence_count` is that N.
    """

    num_sequences: int
    num_tokens: int
    max_response_length: int
    num_nonempty_sequences: int | None = None
    exclude_fully_masked: bool = False

    def __post_init__(self):
        if self.num_sequences < 1:
            raise ValueError(f"GlobalBatchCounts.num_sequences must be >= 1, got {self.num_sequences}")
        if not isinstance(self.exclude_fully_masked, bool):
            raise TypeError(
                f"GlobalBatchCounts.exclude_fully_masked must be a bool, got {self.exclude_fully_masked!r}"
            )
        if self.exclude_fully_masked and self.num_nonempty_sequences is None:
            raise ValueError(
                "GlobalBatchCounts.exclude_fully_masked=True needs num_nonempty_sequences: build the counts with "
                "GlobalBatchCounts.from_masks(..., exclude_fully_masked=True)"
            )
        if self.num_nonempty_sequences is not None and not 0 <= self.num_nonempty_sequences <= self.num_sequences:
            raise ValueError(
                f"GlobalBatchCounts.num_nonempty_sequences must be in [0, num_sequences={self.num_sequences}], "
                f"got {self.num_nonempty_sequences}"
            )
        if self.num_tokens < 0:
            raise ValueError(f"GlobalBatchCounts.num_tokens must be >= 0, got {self.num_tokens}")
        if self.max_response_length < 1:
            raise ValueError(
                f"GlobalBatchCounts.max_response_length must be >= 1, got {self.max_response_length}"
            )

    @property
    def sequence_count(self) -> int:
        """N of the seq-mean aggregations: all rows, or only the non-empty ones with exclude_fully_masked.

        Can be 0 (every row fully masked, exclude_fully_masked=True): the loss is then the empty sum 0."""
        return self.num_nonempty_sequences if self.exclude_fully_masked else self.num_sequences

    @classmethod
    def from_masks(
        cls,
        masks: Sequence[torch.Tensor],
        *,
        dp_group=None,
        cp_group=None,
        max_response_length: int | None = None,
        exclude_fully_masked: bool = False,
    ) -> "GlobalBatchCounts":
        """Count the step's batch from this rank's local response masks of ALL its micro-batches.

        masks: one [b, T_local] mask per micro-batch, already split for CP (T_local = T / cp_size).
        dp_group / cp_group: the data- and context-parallel groups (None = not parallel). Collective: every
        rank of both groups must call it once per step, before the first micro-batch's loss.
        max_response_length: Dr.GRPO's L_max; None takes the largest padded response width of the step
        (T_local * cp_size, maximised over micro-batches and DP ranks). Set it to the generation limit
        (sampling max_tokens) to follow Dr.GRPO exactly.
        exclude_fully_masked: also count the rows with at least one valid token over the whole sequence and make
        them the seq-mean N (`sequence_count`). Under CP the micro-batches must hold the same rows, in the same
        order, on every CP rank of the group (as `split_for_cp` gives): each row's token count is completed by one
        `reduce_sequence_sums` over the CP group, so a row whose valid tokens all lie in another CP rank's
        chunks still counts.
        """
        if not isinstance(exclude_fully_masked, bool):
            raise TypeError(
                f"exclude_fully_masked must be a bool (actor.loss.exclude_fully_masked: true or false), "
                f"got {exclude_fully_masked!r}"
            )
        if len(masks) == 0:
            raise ValueError("GlobalBatchCounts.from_masks needs the masks of at least one micro-batch, got none")
        masks = [as_bool_mask(m, f"masks[{k}]") for k, m in enumerate(masks)]
        device = masks[0].device
        cp_size, cp_rank = group_size(cp_group), group_rank(cp_group)
        local_sequences = sum(m.shape[0] for m in masks)
        local_tokens = sum(m.sum() for m in masks)
        # Rows are replicated over CP ranks: count them on CP rank 0 only; tokens are split, count them all.
        counted = [local_sequences if cp_rank == 0 else 0, local_tokens]
        if exclude_fully_masked:
            nonempty = _count_nonempty_rows(masks, cp_group)  # collective: every CP rank calls it
            counted.append(nonempty if cp_rank == 0 else 0)  # then, like the rows, counted on CP rank 0 only
        totals = torch.stack([torch.as_tensor(c, dtype=torch.int64, device=device) for c in counted])
        for group in (cp_group, dp_group):
            if group_size(group) > 1:
                dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
        if max_response_length is None:
            width = torch.tensor(max(m.shape[1] for m in masks) * cp_size, dtype=torch.int64, device=device)
            if group_size(dp_group) > 1:
                dist.all_reduce(width, op=dist.ReduceOp.MAX, group=dp_group)
            max_response_length = int(width.item())
        num_sequences, num_tokens, *nonempty_total = (int(v) for v in totals.tolist())
        return cls(
            num_sequences=num_sequences, num_tokens=num_tokens, max_response_length=max_response_length,
            num_nonempty_sequences=nonempty_total[0] if exclude_fully_masked else None,
            exclude_fully_masked=exclude_fully_masked,
        )


def _count_nonempty_rows(masks: Sequence[torch.Tensor], cp_group) -> torch.Tensor:
    """Number of this rank's rows (all micro-batches) with |y_i| > 0 over the whole sequence. Collective over CP.

    The per-row local token counts of every micro-batch go through ONE `reduce_sequence_sums` call (the same
    per-sequence CP reduction the losses use for |y_i|), so every CP rank gets each row's global length."""
    local_lengths = torch.cat([m.sum(-1, dtype=torch.int64) for m in masks])[:, None]
    lengths = reduce_sequence_sums(local_lengths, cp_group)[:, 0]
    return (lengths > 0).sum()


def token_weights(
    aggregation: str,
    mask: torch.Tensor,
    sequence_lengths: torch.Tensor | None,
    counts: GlobalBatchCounts,
) -> torch.Tensor:
    """The weights m_it * c_i of the contract (module docstring, item 1) for this micro-batch's local tokens.

    mask: [b, T_local] bool. sequence_lengths: [b] GLOBAL |y_i| (after the CP reduction); needed only
    by "seq-mean-token-mean". Returns a [b, T_local] tensor in float64 (cast by the caller), no grad.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    m = mask.to(torch.float64)
    if aggregation == "token-mean":
        # An all-empty batch has no terms: the loss is the empty sum 0 (weights 0), not 0/0.
        return m / max(counts.num_tokens, 1)
    # N = counts.sequence_count; it is 0 only when every row is fully masked (and excluded): then every weight is
    # already 0 through m, and max(N, 1) keeps the loss the empty sum 0 rather than 0/0.
    num_sequences = max(counts.sequence_count, 1)
    if aggregation == "seq-mean-token-sum":
        return m / num_sequences
    if aggregation == "seq-mean-token-sum-norm":
        return m / (num_sequences * counts.max_response_length)
    if sequence_lengths is None:
        raise ValueError("aggregation 'seq-mean-token-mean' needs the global per-sequence lengths |y_i|")
    per_sequence = 1.0 / (num_sequences * sequence_lengths.to(torch.float64).clamp(min=1))
    return m * per_sequence[:, None]
