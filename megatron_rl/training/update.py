"""One policy update on an actor batch: old (and reference) log-probs, the optimizer step(s), their metrics.

    metrics = policy_update(group, batch, cfg)     # train/*, mismatch/* (the trainer adds rollout/sampling/...)

The trainer calls it after each rollout; `megatron-rl replay-step` calls it on a saved batch with the actor restored
from the checkpoint before that step, without any engine (docs/training.md, "Replaying a step"), so both run the
same update and a replay reproduces the logged loss and gradient norm.
"""
from __future__ import annotations

from typing import Any

from megatron_rl.actor.batch import TOKEN_FIELDS, ActorBatch

__all__ = ["combine_mini_batches", "mismatch_metrics", "policy_update", "split_mini_batches"]

# Metrics summed over the mini-batches of one rollout batch (the rest are averaged).
_SUMMED = ("num_sequences", "num_response_tokens", "num_microbatches", "model_tokens", "step_seconds",
           "fwd_bwd_seconds", "update_skipped")


def policy_update(group, batch: ActorBatch, cfg) -> dict[str, Any]:
    """`algorithm.mini_batches` optimizer steps of the configured loss on `batch` (advantages and rollout log-probs
    set): old log-probs recomputed, reused from the training forward when provably the same
    (AlgorithmSettings.reuses_training_forward), or the rollout's; reference log-probs with a KL term. Afterwards
    batch.old_log_probs holds the log-probs the update used as the old policy's, whichever way they came."""
    algo = cfg.algorithm
    metrics: dict[str, Any] = {}
    from_forward = algo.reuses_training_forward
    if algo.old_log_probs == "recompute" and not from_forward:
        if cfg.actor.moe.routing_replay == "old_policy":  # R2: the training passes replay this pass's routing
            batch.old_log_probs, batch.routed_experts = group.compute_log_probs(batch, record_routing=True)
        else:
            batch.old_log_probs = group.compute_log_probs(batch)
        metrics.update(mismatch_metrics(batch.old_log_probs, batch.rollout_log_probs))
    elif algo.old_log_probs == "rollout":
        batch.old_log_probs = batch.rollout_log_probs
    if cfg.actor.loss.kl_coef > 0:
        batch.ref_log_probs = group.compute_log_probs(batch, model="reference")
    steps = [group.train_step(mini, old_from_forward=from_forward)
             for mini in split_mini_batches(batch, algo.mini_batches, group_size=cfg.sampling.n)]
    if from_forward:  # the policy's log-probs before its update, from that update's own forward: the old ones
        batch.old_log_probs = steps[0].pop("log_probs")
        metrics.update(mismatch_metrics(batch.old_log_probs, batch.rollout_log_probs))
    combined = combine_mini_batches(steps)
    if "moe_routing_agreement" in combined:  # routing replay: the routers' own top-k vs the replayed one
        metrics["moe/routing_agreement"] = combined.pop("moe_routing_agreement")
    metrics.update({f"train/{key}": value for key, value in combined.items()})
    return metrics


def mismatch_metrics(actor_log_probs, rollout_log_probs) -> dict:
    """mismatch/* metrics: the actor's log-probs (before its update) vs the engines' rollout log-probs."""
    from megatron_rl.rollout.mismatch import pad_logprobs, rollout_mismatch

    actor, mask = pad_logprobs(actor_log_probs)
    rollout, _ = pad_logprobs(rollout_log_probs)
    return rollout_mismatch(actor, rollout, mask).as_dict(prefix="mismatch/")


def combine_mini_batches(steps: list[dict]) -> dict:
    """One set of train/* metrics for a rollout batch trained in several optimizer steps: counts and times are
    summed, everything else (loss, grad norm, clip fractions, ratios, KL, entropy) averaged over the steps, so clip
    fractions of the off-policy steps (mini-batch 2, 3, ...) show up."""
    combined = {}
    for key in steps[0]:
        values = [s[key] for s in steps]
        combined[key] = sum(values) if key in _SUMMED else sum(values) / len(values)
    seconds = combined.get("step_seconds")
    if seconds:
        combined["tokens_per_second"] = combined["model_tokens"] / seconds
    combined["optimizer_steps"] = float(len(steps))
    return combined


def split_mini_batches(batch: ActorBatch, parts: int, group_size: int = 1):
    """`parts` mini-batches (contiguous slices) that never cut a group of `group_size` samples in two, as verl's
    mini-batch size counts prompts: groups are spread as evenly as possible; with fewer groups than `parts`, fewer
    mini-batches (the trainer logs train/optimizer_steps)."""
    if len(batch) % group_size:
        raise ValueError(f"batch of {len(batch)} samples is not made of whole groups of {group_size}")
    if parts == 1:
        yield batch
        return
    groups = len(batch) // group_size
    bounds = [round(i * groups / parts) * group_size for i in range(parts + 1)]
    for lo, hi in zip(bounds, bounds[1:]):
        if hi <= lo:
            continue
        fields = {name: getattr(batch, name)[lo:hi] for name in (*TOKEN_FIELDS, "loss_mask", "routed_experts")
                  if getattr(batch, name) is not None}
        yield ActorBatch(prompt_ids=batch.prompt_ids[lo:hi], response_ids=batch.response_ids[lo:hi],
                         advantages=None if batch.advantages is None else batch.advantages[lo:hi], **fields)
