"""Overlong handling from DAPO (Yu et al., arXiv 2503.14476, Sec. 3.4 "Overlong Reward Shaping"), both optional.

1. Soft overlong punishment (DAPO Eq. 13), added to the task reward, with L_max = `max_response_length` and
   L_cache = `cache_length`:

       R_length(|y|) = 0                                  if |y| <= L_max - L_cache
                     = ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
                     = -1                                 if L_max < |y|

   (times `penalty_factor`, 1.0 in the paper). It is continuous: -1 at |y| = L_max. DAPO generates with
   max_tokens = L_max (20480 with L_cache = 4096), so a truncated answer gets the full -1.
2. Overlong filtering: samples truncated by the length limit (vLLM finish_reason "length") get their loss mask
   zeroed, so a cut-off answer is not punished as if it were wrong. They keep their reward for the group's
   advantage statistics; they just contribute no tokens to the loss.

Order in the trainer: task reward -> `apply_overlong_penalty` -> dynamic sampling / LSPO (which must see the
rewards the advantages use) -> advantages -> `apply_truncation_mask` on the loss mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch

from megatron_rl.errors import FieldError

_invalid = partial(FieldError, section="overlong")  # a bad field of this section's config

# The finish reasons the rollout layer reports (mirror of megatron_rl.rollout.types.FinishReason, which this pure
# module does not import; a test checks that the two agree).
FINISH_REASONS = ("stop", "length", "abort")
TRUNCATED = "length"


@dataclass(frozen=True)
class OverlongConfig:
    """soft_penalty: add DAPO's R_length to rewards (needs max_response_length and cache_length);
    mask_truncated: zero the loss mask of responses whose finish_reason is "length".
    """

    soft_penalty: bool = False
    max_response_length: int | None = None
    cache_length: int | None = None
    penalty_factor: float = 1.0
    mask_truncated: bool = False

    def __post_init__(self):
        for flag in ("soft_penalty", "mask_truncated"):
            if not isinstance(getattr(self, flag), bool):
                raise _invalid(flag, f"must be True or False, got {getattr(self, flag)!r}")
        f = self.penalty_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (f >= 0 and math.isfinite(f)):
            raise _invalid('penalty_factor', f"must be a finite number >= 0, got {f!r}")
        if not self.soft_penalty:
            return
        L, c = self.max_response_length, self.cache_length
        if isinstance(L, bool) or not isinstance(L, int) or L < 1:
            raise _invalid("max_response_length", "must be an int >= 1 when soft_penalty is on (set it to the "
                           f"rollout max_tokens), got {L!r}")
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= L:
            raise _invalid("cache_length", f"must be an int in [1, max_response_length={L}] when soft_penalty is on "
                           f"(DAPO uses 4096 of 20480), got {c!r}")


def soft_overlong_penalty(
    response_lengths: torch.Tensor | Sequence[int],
    max_response_length: int,
    cache_length: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO's R_length per response (float64 tensor, values in [-penalty_factor, 0]); see the module docstring."""
    lengths = torch.as_tensor(response_lengths, dtype=torch.float64)
    if lengths.dim() != 1:
        raise ValueError(f"response_lengths must be 1-D (one length per response), got shape {tuple(lengths.shape)}")
    if lengths.numel() and not (torch.isfinite(lengths) & (lengths >= 0)).all():
        raise ValueError(f"response_lengths must be finite token counts >= 0, got {lengths.tolist()}")
    if not 1 <= cache_length <= max_response_length:
        raise ValueError(
            f"cache_length must be in [1, max_response_length={max_response_length}], got {cache_length}"
        )
    expected = max_response_length - cache_length
    penalty = ((expected - lengths) / cache_length).clamp(min=-1.0, max=0.0)
    return penalty * penalty_factor


def apply_overlong_penalty(
    rewards: torch.Tensor, response_lengths: torch.Tensor | Sequence[int], config: OverlongConfig
) -> torch.Tensor:
    """rewards + R_length when config.soft_penalty, else rewards unchanged (a new tensor in rewards' dtype)."""
    if not config.soft_penalty:
        return rewards.clone()
    penalty = soft_overlong_penalty(
        response_lengths, config.max_response_length, config.cache_length, config.penalty_factor
    )
    if penalty.shape != rewards.shape:
        raise ValueError(
            f"rewards has shape {tuple(rewards.shape)} but response_lengths has {tuple(penalty.shape)}: "
            "give one length per reward"
        )
    return (rewards.to(torch.float64) + penalty).to(rewards.dtype)


def truncated_from_finish_reasons(finish_reasons: Sequence[str]) -> torch.Tensor:
    """Bool tensor: True where a response stopped at the length limit (finish_reason == "length")."""
    for i, reason in enumerate(finish_reasons):
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish_reasons[{i}] is {reason!r}; expected one of {FINISH_REASONS}")
    return torch.tensor([reason == TRUNCATED for reason in finish_reasons], dtype=torch.bool)


def apply_truncation_mask(
    loss_mask: torch.Tensor, finish_reasons: Sequence[str], config: OverlongConfig
) -> torch.Tensor:
    """A copy of loss_mask ([n_responses, ...], one row per response) with truncated rows zeroed when
    config.mask_truncated, else an unchanged copy."""
    truncated = truncated_from_finish_reasons(finish_reasons)
    if loss_mask.dim() < 1 or loss_mask.shape[0] != truncated.numel():
        raise ValueError(
            f"loss_mask has {loss_mask.shape[0] if loss_mask.dim() else 0} rows but finish_reasons has "
            f"{truncated.numel()} entries: give one finish reason per response row"
        )
    mask = loss_mask.clone()
    if config.mask_truncated:
        mask[truncated] = 0
    return mask
