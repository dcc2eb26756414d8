"""Supervised (negative log-likelihood) loss under the same global-normalisation contract as the policy losses.

Used for the optional supervised warm-up before RL. Token-mean over the step's valid tokens:
    J = -(1 / N_tok) * sum_i sum_t m_it * log p(y_it)
and, like every loss here, it returns one micro-batch's additive share (see normalization.py).
"""
from __future__ import annotations

import torch

from megatron_rl.algorithms.metrics import LossMetrics
from megatron_rl.algorithms.normalization import GlobalBatchCounts, token_weights
from megatron_rl.algorithms.validation import as_bool_mask

__all__ = ["sft_loss_share"]


def sft_loss_share(log_probs: torch.Tensor, response_mask: torch.Tensor, *, counts: GlobalBatchCounts):
    """log_probs, response_mask: [b, T_local]. Returns (share, metrics with "nll" per token)."""
    mask = as_bool_mask(response_mask, "response_mask")
    if log_probs.shape != mask.shape:
        raise ValueError(f"log_probs has shape {tuple(log_probs.shape)}, response_mask {tuple(mask.shape)}")
    logp = torch.where(mask, log_probs, torch.zeros((), dtype=log_probs.dtype, device=log_probs.device))
    if not torch.isfinite(logp).all():
        raise ValueError("log_probs contains NaN or inf at valid (mask = 1) tokens")
    weights = token_weights("token-mean", mask, None, counts).to(logp.dtype)
    share = -(weights * logp).sum()
    metrics = LossMetrics().add("nll", -logp.detach().sum(), mask.sum())
    return share, metrics
