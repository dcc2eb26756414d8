"""Policy losses (registry by name): PPO, GRPO, DAPO, Dr.GRPO, GSPO, GSPO-token and LUSPO.

Every registered loss is the same computation with a different `LossSpec`: a ratio (per token or per
sequence), a clipped surrogate, and an aggregation (normalisation) from `normalization.py`, which holds the
contract that makes each micro-batch's returned loss an additive share of the full-batch loss.

Per token (d_it = logp_it - logp_old_it, m_it the response mask, A the advantage):
    token ratio        r_it = exp(d_it)                                   (PPO, arXiv 1707.06347)
    sequence ratio     s_i  = exp( sum_t m_it d_it / |y_i| )              (GSPO, arXiv 2507.18071, eq. 7)
                       used in the GSPO-token form s_it = sg(s_i) * exp(logp_it - sg(logp_it)),
                       whose value is s_i and whose gradient w.r.t. logp_it is s_i (GSPO eq. 13-14)
    surrogate          pg_it = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
    off-policy         pg_it *= w_it, a detached weight against the behaviour (rollout) policy: truncated IS
                       min(exp(logp_old_it - logp_rollout_it), C) (`tis_cap`; Yao et al. 2025, "Your Efficient RL
                       Framework Secretly Brings You Off-Policy RL Training") and the other corrections of
                       off_policy.py (`correction=OffPolicyCorrection(...)`: sequence TIS, masked IS, IcePop,
                       DeepSeek-V3.2 off-policy sequence masking). The ratio r / s above stays against logp_old.
    per-token loss     l_it = pg_it + kl_coef * KL_it(pi_theta || pi_ref) - entropy_coef * H_it   (both optional)
and the loss is sum_it m_it c_i l_it with c_i from the aggregation (normalization.py, item 1):
    ppo         token ratio,    eps 0.2 / 0.2,     token-mean
    grpo        token ratio,    eps 0.2 / 0.2,     seq-mean-token-mean      (DeepSeekMath, arXiv 2402.03300, eq. 3)
    dapo        token ratio,    eps 0.2 / 0.28,    token-mean               (DAPO, arXiv 2503.14476, eq. 8)
    dr_grpo     token ratio,    eps 0.2 / 0.2,     seq-mean-token-sum-norm  (Dr.GRPO, arXiv 2503.20783, eq. 3)
    gspo        sequence ratio, eps 3e-4 / 4e-4,   seq-mean-token-mean      (GSPO, arXiv 2507.18071, eq. 5 and sec. 5.1)
    gspo_token  as gspo, but advantages may be per token [B, T] (GSPO-token, eq. 13)
    luspo       sequence ratio, eps 2e-3 / 2.5e-3, seq-mean-token-sum       (LUSPO, arXiv 2602.05261)
With a per-sequence advantage, gspo equals the paper's (1/N) sum_i -min(s_i A_i, clip(s_i) A_i) in value
and gradient (per-token gradient -s_i A_i / (N |y_i|) when unclipped); luspo multiplies each sequence's
term by |y_i|, so its per-token gradient -s_i A_i / N does not depend on the sequence's length.
N counts every row by default; `exclude_fully_masked=True` (config actor.loss.exclude_fully_masked) counts only
rows with at least one unmasked token, as verl's seq-mean modes do (normalization.py, item 1). It lives in the
step's `GlobalBatchCounts` (`from_masks(..., exclude_fully_masked=)`), so `policy_loss_share` follows its counts.
Log-ratios are clamped to [-20, 20] before exp (values that large mean corrupted inputs; it keeps exp finite).

Metrics (metrics.LossMetrics, (sum, count) pairs): over valid tokens: clip_frac_low (ratio < 1 - eps_low
and A < 0: the lower clip zeroes the gradient), clip_frac_high (ratio > 1 + eps_high and A > 0), ratio_mean,
approx_kl (k3 estimate of KL(pi_old || pi_theta)), and when their inputs are given: entropy, kl (to the
reference, with the chosen estimator), rollout_kl (k3 estimate of KL(pi_rollout || pi_old): the
rollout/training mismatch), tis_weight_mean. For sequence-ratio losses also, over non-empty sequences
counted once (on CP rank 0): seq_ratio_mean, seq_clip_frac_low (s_i < 1 - eps_low), seq_clip_frac_high
(s_i > 1 + eps_high).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_rl.algorithms.context_parallel import group_rank, reduce_sequence_sums
from megatron_rl.algorithms.kl import KL_ESTIMATORS, kl_estimate
from megatron_rl.algorithms.metrics import LossMetrics
from megatron_rl.algorithms.normalization import AGGREGATIONS, GlobalBatchCounts, token_weights
from megatron_rl.algorithms.off_policy import OffPolicyCorrection, off_policy_weights
from megatron_rl.algorithms.validation import as_bool_mask, check_finite, check_shape

__all__ = [
    "LossSpec",
    "LOSS_REGISTRY",
    "register_loss",
    "get_loss_spec",
    "policy_loss",
    "policy_loss_share",
]

_LOG_RATIO_CLAMP = 20.0
_EMPTY_BATCH = (
    "response_mask has no sequences (batch dimension 0): pass at least one row, or skip the (micro-)batch "
    "when dynamic sampling kept nothing"
)


def _check_clip(clip_low: float, clip_high: float) -> None:
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low (eps_low) must be in [0, 1) so that 1 - clip_low > 0, got {clip_low}")
    if not clip_high >= 0.0:
        raise ValueError(f"clip_high (eps_high) must be >= 0, got {clip_high}")


@dataclass(frozen=True)
class LossSpec:
    """What distinguishes one policy loss from another; the computation itself is shared.

    ratio_level: "token" (r_it = exp(d_it)) or "sequence" (GSPO-token form of s_i).
    aggregation: one of normalization.AGGREGATIONS.
    clip_low / clip_high: default eps_low / eps_high of the clipped surrogate.
    sequence_advantages_only: True when the paper's formula takes one advantage per sequence ([batch]).
    reference: the paper and equation, shown in error messages and docs.
    """

    name: str
    ratio_level: Literal["token", "sequence"]
    aggregation: str
    clip_low: float
    clip_high: float
    sequence_advantages_only: bool
    reference: str

    def __post_init__(self):
        if self.ratio_level not in ("token", "sequence"):
            raise ValueError(f"LossSpec.ratio_level must be 'token' or 'sequence', got {self.ratio_level!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"LossSpec.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        _check_clip(self.clip_low, self.clip_high)


LOSS_REGISTRY: dict[str, LossSpec] = {}


def register_loss(spec: LossSpec) -> LossSpec:
    """Add a loss to the registry (names are unique)."""
    if spec.name in LOSS_REGISTRY:
        raise ValueError(f"a policy loss named {spec.name!r} is already registered")
    LOSS_REGISTRY[spec.name] = spec
    return spec


def get_loss_spec(name: str) -> LossSpec:
    """The registered spec for `name`; unknown names raise with the list of known ones."""
    try:
        return LOSS_REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown policy loss {name!r}; registered losses: {sorted(LOSS_REGISTRY)}") from None


for _spec in (
    LossSpec("ppo", "token", "token-mean", 0.2, 0.2, False, "PPO clip, arXiv 1707.06347 eq. 7, token mean"),
    LossSpec("grpo", "token", "seq-mean-token-mean", 0.2, 0.2, False, "GRPO, DeepSeekMath arXiv 2402.03300 eq. 3"),
    LossSpec("dapo", "token", "token-mean", 0.2, 0.28, False, "DAPO, arXiv 2503.14476 eq. 8"),
    LossSpec("dr_grpo", "token", "seq-mean-token-sum-norm", 0.2, 0.2, False, "Dr.GRPO, arXiv 2503.20783 eq. 3"),
    LossSpec("gspo", "sequence", "seq-mean-token-mean", 3e-4, 4e-4, True, "GSPO, arXiv 2507.18071 eq. 5"),
    LossSpec("gspo_token", "sequence", "seq-mean-token-mean", 3e-4, 4e-4, False, "GSPO-token, arXiv 2507.18071 eq. 13"),
    LossSpec("luspo", "sequence", "seq-mean-token-sum", 2e-3, 2.5e-3, True, "LUSPO, arXiv 2602.05261"),
):
    register_loss(_spec)


def policy_loss(
    name: str,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    max_response_length: int | None = None,
    exclude_fully_masked: bool = False,
    **options,
) -> tuple[torch.Tensor, LossMetrics]:
    """The loss `name` of a whole batch held by one process: `(loss, metrics)`.

    log_probs, old_log_probs, response_mask: [batch, response_len]; advantages: [batch] (one per sequence)
    or [batch, response_len]. max_response_length: Dr.GRPO's L_max (default response_len).
    exclude_fully_masked: the seq-mean losses divide by the number of rows with at least one unmasked token
    instead of all rows (default False: all rows; see normalization.py, item 1). `options` are
    the keyword options of `policy_loss_share` (clip_low, clip_high, aggregation, kl_coef, kl_estimator,
    ref_log_probs, entropy_coef, entropy, tis_cap, rollout_log_probs). It is `policy_loss_share` with the
    global counts of this one batch, so the distributed path runs the same code.
    """
    for distributed_only in ("counts", "cp_group"):
        if distributed_only in options:
            raise TypeError(
                f"policy_loss is the single-process API and takes no {distributed_only!r}; for DP/CP/micro-batches "
                "use policy_loss_share(..., counts=GlobalBatchCounts.from_masks(...), cp_group=...)"
            )
    get_loss_spec(name)
    mask = as_bool_mask(response_mask, "response_mask")
    if mask.shape[0] == 0:
        raise ValueError(_EMPTY_BATCH)
    counts = GlobalBatchCounts.from_masks(
        [mask], max_response_length=max_response_length, exclude_fully_masked=exclude_fully_masked
    )
    return policy_loss_share(name, log_probs, old_log_probs, advantages, mask, counts=counts, **options)


def policy_loss_share(
    name: str,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    counts: GlobalBatchCounts,
    cp_group=None,
    clip_low: float | None = None,
    clip_high: float | None = None,
    aggregation: str | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    ref_log_probs: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    tis_cap: float | None = None,
    rollout_log_probs: torch.Tensor | None = None,
    correction: OffPolicyCorrection | None = None,
) -> tuple[torch.Tensor, LossMetrics]:
    """This micro-batch's additive share of the step's loss `name`, and its metrics (see normalization.py).

    Tensors hold this rank's local part: its DP rows and, under CP, its CP chunks (`split_for_cp`), shape
    [b, T_local]; advantages [b] or [b, T_local]. counts: the step's `GlobalBatchCounts` (they also decide
    whether fully masked rows count in the seq-mean N: `from_masks(..., exclude_fully_masked=)`). cp_group: the
    context-parallel group (None = no CP); sequence-ratio losses and "seq-mean-token-mean" all-reduce two
    scalars per sequence over it, so every CP rank must call this for the same micro-batch.

    Options: clip_low / clip_high override the spec's eps; aggregation overrides its normalisation;
    kl_coef > 0 adds kl_coef * KL(pi_theta || pi_ref) per token (needs ref_log_probs; kl_estimator in
    k1/k2/k3/low_var_kl); entropy_coef adds -entropy_coef * entropy per token (needs entropy, the per-token
    policy entropy, differentiable); tis_cap = C enables truncated importance sampling with weights
    min(exp(old_log_probs - rollout_log_probs), C); correction: the other corrections against the behaviour
    policy (off_policy.py). ref_log_probs, entropy and rollout_log_probs given without their coefficient are used for
    metrics only.
    """
    spec = get_loss_spec(name)
    clip_low = spec.clip_low if clip_low is None else float(clip_low)
    clip_high = spec.clip_high if clip_high is None else float(clip_high)
    aggregation = spec.aggregation if aggregation is None else aggregation
    mask = _validate(
        spec, log_probs, old_log_probs, advantages, response_mask, counts, clip_low, clip_high, aggregation,
        kl_coef, kl_estimator, ref_log_probs, entropy_coef, entropy, tis_cap, rollout_log_probs, correction,
    )
    dtype = torch.promote_types(log_probs.dtype, torch.float32)

    def valid(x: torch.Tensor) -> torch.Tensor:
        # Padding may hold garbage (even NaN); zero it before any arithmetic so it cannot reach values or grads.
        return torch.where(mask, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))

    # old/rollout/reference log-probs and advantages are data: no gradient flows into them.
    logp, old = valid(log_probs), valid(old_log_probs.detach())
    log_ratio = logp - old
    adv = advantages.detach().to(dtype)
    adv = valid(adv[:, None].expand_as(logp) if adv.dim() == 1 else adv)
    m = mask.to(dtype)

    needs_sequence_sums = spec.ratio_level == "sequence" or aggregation == "seq-mean-token-mean"
    seq_log_ratio = seq_len = None
    if needs_sequence_sums:
        local = torch.stack([(log_ratio.detach() * m).sum(-1), m.sum(-1)], dim=-1)
        seq_log_ratio, seq_len = reduce_sequence_sums(local, cp_group).unbind(-1)

    if spec.ratio_level == "sequence":
        seq_log_s = (seq_log_ratio / seq_len.clamp(min=1)).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        ratio = torch.exp(seq_log_s[:, None] + (logp - logp.detach()))  # GSPO-token: value s_i, d/dlogp = s_i
    else:
        ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))

    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(-ratio * adv, -clipped_ratio * adv)

    metrics = LossMetrics()
    if rollout_log_probs is not None:
        rollout = valid(rollout_log_probs.detach())
        metrics.add("rollout_kl", (kl_estimate(rollout, old, "k3") * m).sum(), m.sum())
        if tis_cap is not None or (correction is not None and correction.enabled):
            weights, correction_metrics = off_policy_weights(old, rollout, mask, adv, correction, token_tis_cap=tis_cap,
                                                             cp_group=cp_group)
            per_token = per_token * weights
            metrics.merge(correction_metrics)
    if ref_log_probs is not None:
        kl = kl_estimate(logp, valid(ref_log_probs.detach()), kl_estimator)
        metrics.add("kl", (kl.detach() * m).sum(), m.sum())
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl
    if entropy is not None:
        ent = valid(entropy)
        metrics.add("entropy", (ent.detach() * m).sum(), m.sum())
        if entropy_coef != 0:
            per_token = per_token - entropy_coef * ent

    weights = token_weights(aggregation, mask, seq_len, counts).to(dtype)
    loss = (weights * per_token).sum()

    _token_metrics(metrics, ratio.detach(), adv, mask, logp.detach(), old, clip_low, clip_high)
    if spec.ratio_level == "sequence":
        _sequence_metrics(metrics, seq_log_s, seq_len, clip_low, clip_high, count_here=group_rank(cp_group) == 0)
    return loss, metrics


def _token_metrics(metrics, ratio, adv, mask, logp, old, clip_low, clip_high) -> None:
    n = mask.sum()
    metrics.add("clip_frac_low", ((ratio < 1.0 - clip_low) & (adv < 0) & mask).sum(), n)
    metrics.add("clip_frac_high", ((ratio > 1.0 + clip_high) & (adv > 0) & mask).sum(), n)
    metrics.add("ratio_mean", (ratio * mask).sum(), n)
    metrics.add("approx_kl", (kl_estimate(old, logp, "k3") * mask).sum(), n)


def _sequence_metrics(metrics, seq_log_s, seq_len, clip_low, clip_high, count_here: bool) -> None:
    # Identical on every CP rank after the reduction: count each sequence once, on CP rank 0.
    present = (seq_len > 0) if count_here else torch.zeros_like(seq_len, dtype=torch.bool)
    s = torch.exp(seq_log_s)
    metrics.add("seq_ratio_mean", (s * present).sum(), present.sum())
    metrics.add("seq_clip_frac_low", ((s < 1.0 - clip_low) & present).sum(), present.sum())
    metrics.add("seq_clip_frac_high", ((s > 1.0 + clip_high) & present).sum(), present.sum())


def _is_finite_number(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _validate(
    spec, log_probs, old_log_probs, advantages, response_mask, counts, clip_low, clip_high, aggregation,
    kl_coef, kl_estimator, ref_log_probs, entropy_coef, entropy, tis_cap, rollout_log_probs, correction,
) -> torch.Tensor:
    """All input checks of policy_loss_share, cheapest first; returns the bool mask."""
    if not isinstance(counts, GlobalBatchCounts):
        raise TypeError(
            f"counts must be a GlobalBatchCounts (GlobalBatchCounts.from_masks(...)), got {type(counts).__name__}"
        )
    _check_clip(clip_low, clip_high)
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; choose one of {KL_ESTIMATORS}")
    for field, coef in (("kl_coef", kl_coef), ("entropy_coef", entropy_coef)):
        # NaN compares False with everything: unchecked, a NaN kl_coef would silently switch the KL term off
        if isinstance(coef, (bool, str)) or not _is_finite_number(coef):
            raise ValueError(f"{field} must be a finite number (0 disables the term), got {coef!r}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_log_probs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_log_probs (the reference policy's per-token log-probs)")
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy (the policy's per-token entropy, differentiable)")
    if tis_cap is not None:
        if not tis_cap > 0:
            raise ValueError(f"tis_cap must be > 0 (or None to disable truncated importance sampling), got {tis_cap}")
        if rollout_log_probs is None:
            raise ValueError("tis_cap is set but rollout_log_probs is missing: pass the rollout engine's log-probs")
    if correction is not None:
        if not isinstance(correction, OffPolicyCorrection):
            raise TypeError(f"correction must be an OffPolicyCorrection, got {type(correction).__name__}")
        if correction.enabled and rollout_log_probs is None:
            raise ValueError("an off-policy correction is on but rollout_log_probs is missing: pass the rollout "
                             "engine's log-probs (the behaviour policy the correction is against)")

    mask = as_bool_mask(response_mask, "response_mask")
    shape = tuple(mask.shape)
    layout = "[batch, response_len], like response_mask"
    check_shape("log_probs", log_probs, shape, layout)
    check_shape("old_log_probs", old_log_probs, shape, layout)
    optional = {"ref_log_probs": ref_log_probs, "entropy": entropy, "rollout_log_probs": rollout_log_probs}
    for field, tensor in optional.items():
        if tensor is not None:
            check_shape(field, tensor, shape, layout)
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if advantages.dim() == 2 and spec.sequence_advantages_only:
        raise ValueError(
            f"loss {spec.name!r} ({spec.reference}) takes one advantage per sequence, shape ({shape[0]},); got "
            f"{tuple(advantages.shape)}. Use 'gspo_token' for per-token advantages"
        )
    if advantages.dim() == 1:
        check_shape("advantages", advantages, shape[:1], "one per sequence [batch]")
    else:
        check_shape("advantages", advantages, shape, "[batch] or [batch, response_len]")
    device = log_probs.device
    for field, tensor in {"old_log_probs": old_log_probs, "advantages": advantages, "response_mask": mask,
                          **optional}.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{field} is on {tensor.device} but log_probs is on {device}: move it to {device}")
    if shape[0] == 0:
        raise ValueError(_EMPTY_BATCH)
    if shape[0] > counts.num_sequences:
        raise ValueError(
            f"this micro-batch has {shape[0]} sequences but counts.num_sequences={counts.num_sequences}: the global "
            "counts must be built from the masks of every micro-batch of the step (GlobalBatchCounts.from_masks)"
        )

    check_finite("log_probs", log_probs, mask)
    check_finite("old_log_probs", old_log_probs, mask)
    check_finite("advantages", advantages, None if advantages.dim() == 1 else mask)
    for field, tensor in optional.items():
        if tensor is not None:
            check_finite(field, tensor, mask)
    return mask
