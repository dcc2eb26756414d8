"""Training/rollout mismatch: the actor's recomputed log-probs vs the rollout engine's, on the same sampled tokens.

Pure torch. Both inputs are log pi(y_t | x, y_<t) of the sampled tokens under the same weights, so ideally they are
equal (docs/design.md, contract 4; compare like with like: the engine's `logprobs_mode="processed_logprobs"` with
top_p=1/top_k=-1 is log_softmax(logits / T), which is what the actor recomputes at temperature T). They differ
through kernels and precision (bf16 vLLM vs Megatron), MoE routing flips, and bugs: stale weights after a sync, a
wrong temperature, a shifted response mask. A step whose mismatch jumps is a step whose importance ratios are wrong.

With d_it = m_it (logp_actor_it - logp_rollout_it) and |y_i| = sum_t m_it:
- `mean_abs_diff` = sum_it |d_it| / sum_it m_it, and `max_abs_diff` = max_it |d_it| (token level);
- `seq_log_ratio_max_abs` = max_i |sum_t d_it|: the log of the sequence-level importance ratio
  pi_actor(y_i | x) / pi_rollout(y_i | x) that truncated importance sampling corrects for (Yao et al., 2025, "Your
  Efficient RL Framework Secretly Brings You Off-Policy RL Training");
- `seq_mean_log_ratio_max_abs` = max_i |sum_t d_it / |y_i||: the same, length-normalised, i.e. log s_i of GSPO
  (arXiv 2507.18071, the sequence importance ratio s_i) with the rollout policy as the old policy; compare it with
  GSPO/LUSPO's clip range;
- `seq_log_ratio_mean` = mean_i sum_t d_it (signed: a systematic bias shows here).
Sequences with no valid token are left out of the sequence metrics; with no valid token at all every metric is NaN.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class MismatchMetrics:
    mean_abs_diff: float
    max_abs_diff: float
    seq_log_ratio_max_abs: float
    seq_mean_log_ratio_max_abs: float
    seq_log_ratio_mean: float
    num_tokens: int
    num_sequences: int

    def as_dict(self, prefix: str = "rollout/mismatch_") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


def _check(name: str, tensor: torch.Tensor, shape: torch.Size | None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be [batch, tokens], got shape {tuple(tensor.shape)}")
    if shape is not None and tensor.shape != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} like actor_logprobs")


@torch.no_grad()
def rollout_mismatch(
    actor_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> MismatchMetrics:
    """Mismatch metrics over the valid tokens (`response_mask` 1) of [batch, tokens] log-prob tensors."""
    _check("actor_logprobs", actor_logprobs, None)
    _check("rollout_logprobs", rollout_logprobs, actor_logprobs.shape)
    _check("response_mask", response_mask, actor_logprobs.shape)
    mask = response_mask.to(torch.float64)
    if not torch.all((mask == 0) | (mask == 1)):
        raise ValueError("response_mask must hold only 0 and 1")
    valid = mask.bool()
    for name, t in (("actor_logprobs", actor_logprobs), ("rollout_logprobs", rollout_logprobs)):
        if not torch.isfinite(t[valid]).all():
            raise ValueError(f"{name} has NaN/inf at valid tokens (response_mask 1)")
    num_tokens = int(mask.sum())
    lengths = mask.sum(dim=1)
    has_tokens = lengths > 0
    num_sequences = int(has_tokens.sum())
    if num_tokens == 0:
        nan = float("nan")
        return MismatchMetrics(nan, nan, nan, nan, nan, 0, 0)
    diff = torch.where(valid, actor_logprobs.to(torch.float64) - rollout_logprobs.to(torch.float64), 0.0)
    seq_sum = diff.sum(dim=1)[has_tokens]
    seq_mean = seq_sum / lengths[has_tokens]
    return MismatchMetrics(
        mean_abs_diff=float(diff.abs().sum() / num_tokens),
        max_abs_diff=float(diff.abs().max()),
        seq_log_ratio_max_abs=float(seq_sum.abs().max()),
        seq_mean_log_ratio_max_abs=float(seq_mean.abs().max()),
        seq_log_ratio_mean=float(seq_sum.mean()),
        num_tokens=num_tokens,
        num_sequences=num_sequences,
    )


def pad_logprobs(
    sequences: Sequence[Sequence[float] | torch.Tensor], *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-sequence log-probs (`Completion.logprobs` lists, or the actor's 1-D tensors) -> right-padded
    [batch, max_len] values and mask. The values are scattered in one assignment (the mask's row-major order is the
    concatenation's), not two slice assignments per sequence."""
    rows = [torch.as_tensor(seq, dtype=dtype) for seq in sequences]
    lengths = torch.tensor([row.numel() for row in rows], dtype=torch.long)
    max_len = int(lengths.max()) if rows else 0
    valid = torch.arange(max_len) < lengths[:, None]
    values = torch.zeros(len(rows), max_len, dtype=dtype)
    if rows:
        values[valid] = torch.cat([row.reshape(-1) for row in rows])
    return values, valid.to(torch.float32)
