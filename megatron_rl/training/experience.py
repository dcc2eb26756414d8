"""From rollouts to training data: score completions into groups, filter (on the driver), build the actor batch.

The driver is the single place where sampling decisions are made (docs/design.md, contract 3): `fill_batch` runs
there once per step (in the trainer's `_collect`) and every actor rank then receives the identical `ActorBatch`
through Ray. (`algorithms.rank0.decide_on_rank0`
serves the same purpose for torchrun-style launches without a driver.)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from megatron_rl.actor.batch import ActorBatch
from megatron_rl.algorithms import GroupOutcome, OverlongConfig, apply_overlong_penalty, apply_truncation_mask, compute_advantages
from megatron_rl.rewards import RewardItem
from megatron_rl.rollout.types import Completion


@dataclass
class ScoredGroup:
    """One prompt's group: its completions, the verifier's scores and the shaped rewards (overlong penalty)."""

    prompt: object  # megatron_rl.data.PromptExample
    completions: list[Completion]
    scores: list[float]
    rewards: list[float]


@dataclass
class Rollouts:
    """One step's training data before the actor sees it: the groups dynamic sampling + LSPO kept (in generation
    order) and what producing them measured (sampling/*, reward/*, rollout/*, batch/* metrics; rollout and reward
    seconds; messages for the log). Made by the trainer's `_collect`, inline (synchronous) or ahead of time by the
    rollout producer (asynchronous), and saved with a checkpoint while not yet trained (`to_json`)."""

    step: int
    groups: list[ScoredGroup]
    metrics: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    generated: list[ScoredGroup] = field(default_factory=list)  # every scored group, kept or not (not saved in JSON)

    def weights_versions(self) -> list[int]:
        """The weights version that generated each kept sample."""
        return [c.weights_version for g in self.groups for c in g.completions]

    def to_json(self) -> dict[str, Any]:
        """Plain data (prompts by their dataset row): exact floats, no pickle. Routed experts (MoE routing replay)
        are left out: `routing_tensors` holds them, for a weights-only tensor file."""
        return {
            "step": self.step, "metrics": self.metrics, "seconds": self.seconds, "messages": self.messages,
            "groups": [{"row": g.prompt.row, "scores": g.scores, "rewards": g.rewards,
                        "completions": [{**asdict(c), "routed_experts": None} for c in g.completions]}
                       for g in self.groups],
        }

    def routing_tensors(self) -> dict[str, torch.Tensor]:
        """The completions' routed experts by "step/group/sample" (empty without routing replay)."""
        return {f"{self.step}/{g}/{s}": torch.from_numpy(c.routed_experts)
                for g, group in enumerate(self.groups) for s, c in enumerate(group.completions)
                if c.routed_experts is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any], examples_by_row: dict[int, Any],
                  routing: dict[str, torch.Tensor] | None = None) -> "Rollouts":
        groups = []
        for g_index, g in enumerate(data["groups"]):
            if g["row"] not in examples_by_row:
                raise ValueError(f"a saved rollout group refers to prompt row {g['row']}, which data.train no longer "
                                 "holds: resume with the data the checkpoint was written with")
            completions = [Completion(**c) for c in g["completions"]]
            for s_index, c in enumerate(completions):
                key = f"{data['step']}/{g_index}/{s_index}"
                if routing and key in routing:
                    c.routed_experts = routing[key].numpy()
            groups.append(ScoredGroup(examples_by_row[g["row"]], completions, list(g["scores"]), list(g["rewards"])))
        return cls(int(data["step"]), groups, dict(data["metrics"]), dict(data["seconds"]), list(data["messages"]))


def score_round(prompts: Sequence, completions: Sequence[Completion], reward_pool, overlong: OverlongConfig, n: int):
    """Group `completions` (ordered by prompt, sample) by prompt, score them, shape rewards.

    Returns (GroupOutcome list with ScoredGroup payloads, RewardMetrics of the scoring call).
    """
    if len(completions) != len(prompts) * n:
        raise RuntimeError(f"expected {len(prompts) * n} completions ({len(prompts)} prompts x n={n}), got {len(completions)}")
    items = [
        RewardItem(c.text, prompts[c.prompt_index].ground_truth, prompts[c.prompt_index].data_source,
                   prompts[c.prompt_index].extra_info)
        for c in completions
    ]
    scores, metrics = reward_pool.score(items)
    lengths = [len(c.token_ids) for c in completions]
    shaped = apply_overlong_penalty(torch.tensor(scores, dtype=torch.float64), lengths, overlong).tolist()
    outcomes = []
    for p, prompt in enumerate(prompts):
        span = slice(p * n, (p + 1) * n)
        group = ScoredGroup(prompt, list(completions[span]), list(scores[span]), shaped[span])
        outcomes.append(GroupOutcome(rewards=group.rewards, response_lengths=lengths[span], payload=group))
    return outcomes, metrics


def build_actor_batch(groups: Sequence[ScoredGroup], advantage: str, overlong: OverlongConfig) -> ActorBatch:
    """Samples of all groups, their GRPO-family advantages, rollout log-probs and loss masks."""
    n = len(groups[0].completions)
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)
    advantages = compute_advantages(advantage, rewards, group_size=n)
    completions = [c for g in groups for c in g.completions]
    prompts = [g.prompt.prompt_token_ids for g in groups for _ in g.completions]
    keep = apply_truncation_mask(torch.ones(len(completions), dtype=torch.bool), [c.finish_reason for c in completions], overlong)
    routed = None
    if completions and completions[0].routed_experts is not None:  # MoE routing replay (R3)
        routed = [torch.from_numpy(c.routed_experts) for c in completions]
    return ActorBatch(
        prompt_ids=prompts,
        response_ids=[c.token_ids for c in completions],
        advantages=advantages,
        rollout_log_probs=[c.logprobs for c in completions],
        loss_mask=[torch.full((len(c.token_ids),), bool(k)) for c, k in zip(completions, keep.tolist())],
        routed_experts=routed,
    )


def rollout_stats(groups: Sequence[ScoredGroup], prefix: str = "rollout/") -> dict[str, float]:
    """Reward, accuracy and response-length statistics of `groups` (all generated, or the filtered batch)."""
    scores = torch.tensor([s for g in groups for s in g.scores], dtype=torch.float64)
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float64)
    lengths = torch.tensor([len(c.token_ids) for g in groups for c in g.completions], dtype=torch.float64)
    truncated = torch.tensor([c.finish_reason == "length" for g in groups for c in g.completions], dtype=torch.float64)
    if lengths.numel() == 0:
        return {}
    q = torch.quantile(lengths, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {
        f"{prefix}reward_mean": float(rewards.mean()),
        f"{prefix}score_mean": float(scores.mean()),
        f"{prefix}accuracy": float((scores >= 0.5).double().mean()),
        f"{prefix}response_length_mean": float(lengths.mean()),
        f"{prefix}response_length_p10": float(q[0]),
        f"{prefix}response_length_p50": float(q[1]),
        f"{prefix}response_length_p90": float(q[2]),
        f"{prefix}response_length_max": float(lengths.max()),
        f"{prefix}truncated_frac": float(truncated.mean()),
        f"{prefix}num_samples": float(lengths.numel()),
    }


def generate_grouped(pool, prompt_token_ids: list[list[int]], sampling) -> list[list[Completion]]:
    """pool.generate as the evaluator wants it: one list of n completions per prompt, in request order."""
    flat = pool.generate(prompt_token_ids, sampling)
    return [flat[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompt_token_ids))]
