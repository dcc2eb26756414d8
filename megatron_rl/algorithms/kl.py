"""Per-token KL estimators (Schulman, "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html).

`kl_estimate(sample_log_probs, other_log_probs, name)` estimates KL(p || q) per token, where the tokens
were sampled from p, sample_log_probs = log p(x) and other_log_probs = log q(x). With log r = log q - log p:
    k1 = -log r                 unbiased, high variance, can be negative
    k2 = (log r)^2 / 2          biased, low variance
    k3 = (r - 1) - log r        unbiased, low variance, >= 0 ("low_var_kl")
k3 is computed with log r clamped to [-20, 20] (so exp cannot overflow) and the estimate clamped to
[0, 10] nats per token (as the "low_var_kl" of verl and the GRPO paper's k3 term in practice).

Uses: the KL penalty to a reference policy, KL(pi_theta || pi_ref) = kl_estimate(log_probs, ref_log_probs)
(GRPO, arXiv 2402.03300, eq. 4 uses k3); the approx-KL metric between the old and new policy,
KL(pi_old || pi_theta) = kl_estimate(old_log_probs, log_probs, "k3").
"""
from __future__ import annotations

import torch

__all__ = ["KL_ESTIMATORS", "kl_estimate"]

KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
_LOG_RATIO_CLAMP = 20.0
_K3_MAX = 10.0


def kl_estimate(sample_log_probs: torch.Tensor, other_log_probs: torch.Tensor, name: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(p || q) from tokens sampled from p (see the module docstring)."""
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; choose one of {KL_ESTIMATORS}")
    log_r = other_log_probs - sample_log_probs
    if name == "k1":
        return -log_r
    if name == "k2":
        return 0.5 * log_r.square()
    log_r = log_r.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return (torch.expm1(log_r) - log_r).clamp(0.0, _K3_MAX)
