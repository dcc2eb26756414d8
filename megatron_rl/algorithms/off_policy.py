"""Off-policy corrections between the behaviour policy (the engine that sampled) and the proximal policy (the actor).

Three policies meet in one update (decoupled PPO, Hilton et al. 2022, "Batch size-invariance for policy
optimization", arXiv 2110.00641; used for asynchronous RL by AReaL, Fu et al. 2025, arXiv 2505.24298):
- mu: the behaviour policy, the rollout engine's weights and kernels that sampled the tokens (`rollout_log_probs`);
- pi_old: the proximal policy, the actor's own log-probs before the update (`old_log_probs`, recomputed);
- pi_theta: the policy being trained (`log_probs`).
The policy loss's ratio (token r_it = pi_theta / pi_old, or GSPO/LUSPO's sequence s_i) is ALWAYS against pi_old, so
its clip range keeps its meaning. The corrections here are against mu only: with rho_it = pi_old(y_t) / mu(y_t) =
exp(old_log_probs - rollout_log_probs), each multiplies the per-token policy-gradient term by a detached weight
w_it >= 0 (a product of the enabled terms below). They correct for asynchronous rollouts (mu is up to
`algorithm.max_staleness` versions old) and for engine/trainer numerical mismatch (bf16 kernels, MoE routing).

| term | weight | reference |
|---|---|---|
| token TIS, the loss's `tis_cap=C` | min(rho_it, C) | Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" |
| sequence TIS, `seq_tis_cap=C` | min(prod_t rho_it, C) for every token of sequence i | same; verl's sequence-level rollout IS |
| masked IS, `mis=token|sequence|geometric` in [lo, hi] | token: rho_it if lo <= rho_it <= hi else 0; sequence: R_i = prod_t rho_it; geometric: R_i = exp(mean_t log rho_it); the sequence's tokens get R_i inside the band, 0 outside | Yao et al. 2025 (MIS); Liu et al. 2025, "When Speed Kills Stability" (token / sequence / geometric variants) |
| IcePop, `icepop_low/high` | 1 if low <= rho_it <= high else 0 (no reweighting) | Ling Team 2025, "Every Step Evolves: Scaling RL for Trillion-Scale Thinking Model" (IcePop) |
| off-policy sequence masking, `seq_mask_kl=delta` | 0 for every token of a sequence with A < 0 and (1/|y_i|) sum_t (log mu - log pi_old) > delta, else 1 | DeepSeek-AI 2025, DeepSeek-V3.2, Sec. 3.1 ("Off-Policy Sequence Masking") |

The sequence terms need sum_t m_it log rho_it and |y_i| over the whole sequence: under context parallelism they are
all-reduced as two scalars per sequence over the CP group (docs/design.md, contract 2), like GSPO's ratio. Masked
tokens keep counting in the loss's normalisers (the global counts are fixed once per step, contract 1): masking
zeroes a token's term, as DAPO's overlong masking of a token would. The weights are functions of pi_old and mu
only (data), so they carry no gradient.

Metrics (token metrics over valid tokens, sequence metrics once per sequence on CP rank 0): `tis_weight_mean` (mean
min(rho_it, C), token TIS only), `offpolicy/weight_mean` (mean w_it, with any term of OffPolicyCorrection on),
`offpolicy/token_tis_clip_frac`, `offpolicy/seq_tis_clip_frac`,
`offpolicy/mis_masked_frac` (tokens), `offpolicy/icepop_masked_frac`, `offpolicy/seq_masked_frac` (sequences
masked by the KL rule), `offpolicy/seq_log_rho_mean` (mean over sequences of sum_t log rho_it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch

from megatron_rl.algorithms.context_parallel import group_rank, reduce_sequence_sums
from megatron_rl.algorithms.metrics import LossMetrics
from megatron_rl.errors import FieldError

__all__ = ["MIS_LEVELS", "OffPolicyCorrection", "off_policy_weights"]

MIS_LEVELS = ("none", "token", "sequence", "geometric")
_LOG_CLAMP = 20.0  # exp(20) ~ 5e8: keeps every weight finite; values that large mean corrupted log-probs anyway
_invalid = partial(FieldError, section="off_policy")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@dataclass(frozen=True)
class OffPolicyCorrection:
    """Which corrections against the behaviour policy are on (module docstring); all off by default. Token-level
    TIS is the policy loss's own `tis_cap` option (config actor.loss.tis_cap), kept there for compatibility.

    seq_tis_cap: C of sequence-level truncated importance sampling; null = off.
    mis: masked importance sampling level ("none" = off), with the band [mis_low, mis_high] on rho.
    icepop_low / icepop_high: IcePop's band on rho_it (both set = on).
    seq_mask_kl: delta of DeepSeek-V3.2's off-policy sequence masking (null = off).
    """

    seq_tis_cap: float | None = None
    mis: Literal["none", "token", "sequence", "geometric"] = "none"
    mis_low: float = 0.5
    mis_high: float = 2.0
    icepop_low: float | None = None
    icepop_high: float | None = None
    seq_mask_kl: float | None = None

    def __post_init__(self):
        if self.seq_tis_cap is not None and not _positive(self.seq_tis_cap):
            raise _invalid("seq_tis_cap", f"must be a finite number > 0 or null (off), got {self.seq_tis_cap!r}")
        if self.mis not in MIS_LEVELS:
            raise _invalid("mis", f"must be one of {list(MIS_LEVELS)}, got {self.mis!r}")
        for low, high in (("mis_low", "mis_high"), ("icepop_low", "icepop_high")):
            lo, hi = getattr(self, low), getattr(self, high)
            if (lo is None) != (hi is None):
                raise _invalid(high if hi is None else low, f"{low} and {high} are set together (both null = off)")
            if lo is not None and not (_positive(lo) and _positive(hi) and lo < 1 < hi):
                raise _invalid(low, f"the band [{low}, {high}] must satisfy 0 < {low} < 1 < {high} (finite), "
                                    f"got [{lo!r}, {hi!r}]")
        if self.seq_mask_kl is not None and not (isinstance(self.seq_mask_kl, (int, float))
                                                 and math.isfinite(self.seq_mask_kl) and self.seq_mask_kl >= 0):
            raise _invalid("seq_mask_kl", f"must be a finite number >= 0 or null (off), got {self.seq_mask_kl!r}")

    @property
    def icepop(self) -> bool:
        return self.icepop_low is not None

    @property
    def needs_sequence_sums(self) -> bool:
        return self.seq_tis_cap is not None or self.mis in ("sequence", "geometric") or self.seq_mask_kl is not None

    @property
    def enabled(self) -> bool:
        return self.seq_tis_cap is not None or self.mis != "none" or self.icepop or self.seq_mask_kl is not None


def off_policy_weights(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    correction: OffPolicyCorrection | None = None,
    *,
    token_tis_cap: float | None = None,
    cp_group=None,
) -> tuple[torch.Tensor, LossMetrics]:
    """The [b, T_local] weights w_it (0 at invalid tokens) and their metrics, for this rank's local tokens.
    token_tis_cap: C of token-level TIS (the loss's tis_cap); correction: the other terms (None = none of them).

    old_log_probs / rollout_log_probs: [b, T_local] with zeros at invalid tokens; mask: [b, T_local] bool;
    advantages: [b, T_local] (a sequence advantage broadcast over its tokens, or per-token advantages).
    Collective over cp_group when a sequence term is on (every CP rank calls it for the same micro-batch)."""
    correction = correction or OffPolicyCorrection()
    dtype = old_log_probs.dtype
    m = mask.to(dtype)
    log_rho = torch.where(mask, old_log_probs - rollout_log_probs, torch.zeros((), dtype=dtype))
    rho = torch.exp(log_rho.clamp(max=_LOG_CLAMP))
    log_rho = log_rho.clamp(-_LOG_CLAMP, _LOG_CLAMP)
    n_tokens = m.sum()
    weights = m.clone()
    metrics = LossMetrics()

    seq_log_rho = seq_len = seq_negative = None
    if correction.needs_sequence_sums:
        negative = ((advantages < 0) & mask).to(dtype)
        local = torch.stack([log_rho.sum(-1), m.sum(-1), negative.sum(-1)], dim=-1)
        seq_log_rho, seq_len, seq_negative = reduce_sequence_sums(local, cp_group).unbind(-1)
        present = (seq_len > 0) if group_rank(cp_group) == 0 else torch.zeros_like(seq_len, dtype=torch.bool)
        n_seq = present.sum()
        metrics.add("offpolicy/seq_log_rho_mean", (seq_log_rho * present).sum(), n_seq)

    if token_tis_cap is not None:
        tis_weight = rho.clamp(max=token_tis_cap)
        weights = weights * tis_weight
        metrics.add("tis_weight_mean", (tis_weight * m).sum(), n_tokens)
        if correction.enabled:
            metrics.add("offpolicy/token_tis_clip_frac", ((rho > token_tis_cap) & mask).sum(), n_tokens)
    if correction.seq_tis_cap is not None:
        cap = correction.seq_tis_cap
        seq_rho = torch.exp(seq_log_rho.clamp(-_LOG_CLAMP, _LOG_CLAMP))
        weights = weights * seq_rho.clamp(max=cap)[:, None]
        metrics.add("offpolicy/seq_tis_clip_frac", ((seq_rho > cap) & present).sum(), n_seq)
    if correction.mis != "none":
        lo, hi = correction.mis_low, correction.mis_high
        if correction.mis == "token":
            ratio = rho
        else:
            seq_log = seq_log_rho if correction.mis == "sequence" else seq_log_rho / seq_len.clamp(min=1)
            ratio = torch.exp(seq_log.clamp(-_LOG_CLAMP, _LOG_CLAMP))[:, None].expand_as(rho)
        inside = (ratio >= lo) & (ratio <= hi)
        weights = weights * torch.where(inside, ratio, torch.zeros((), dtype=dtype))
        metrics.add("offpolicy/mis_masked_frac", (~inside & mask).sum(), n_tokens)
    if correction.icepop:
        inside = (rho >= correction.icepop_low) & (rho <= correction.icepop_high)
        weights = weights * inside.to(dtype)
        metrics.add("offpolicy/icepop_masked_frac", (~inside & mask).sum(), n_tokens)
    if correction.seq_mask_kl is not None:
        # mean_t (log mu - log pi_old) = -mean_t log rho: the k1 estimate of KL(mu || pi_old) on mu's samples
        seq_kl = -seq_log_rho / seq_len.clamp(min=1)
        too_far = (seq_kl > correction.seq_mask_kl)[:, None] & (advantages < 0)
        weights = weights * (~too_far).to(dtype)
        seq_masked = (seq_kl > correction.seq_mask_kl) & present & (seq_negative > 0)
        metrics.add("offpolicy/seq_masked_frac", seq_masked.sum(), n_seq)
    if correction.enabled:
        metrics.add("offpolicy/weight_mean", (weights * m).sum(), n_tokens)
    return weights.detach(), metrics
