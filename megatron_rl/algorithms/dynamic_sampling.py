"""Dynamic sampling: the DAPO accuracy filter, LSPO on top of it, and the over-sampling loop that fills a batch.

Sources:
- DAPO (Yu et al., arXiv 2503.14476, Sec. 3.2 "Dynamic Sampling" and Algorithm 1): drop every group whose rewards
  are all equal (all correct or all wrong: its group-relative advantages are all zero, so it carries no gradient)
  and keep sampling until the batch is filled with groups that have reward variance.
- LSPO (Chen et al., arXiv 2510.01459): after that accuracy filter, keep only prompts whose mean response length is
  in the short or long tail of the batch (`lspo.py`); thresholds are recomputed for each generated batch, so here
  they are computed per generation round over the groups of that round that reached the length filter.

The loop (`fill_batch`), per training step:
1. call `generate_round(round_index)` -> one round of groups (`GroupOutcome`: rewards and response lengths of one
   prompt's responses, plus an opaque payload the caller uses to find the samples again, e.g. sample ids);
2. `select_round` filters it; kept groups join the batch in generation order;
3. stop as soon as `target_groups` groups are kept, or after `max_rounds` rounds (the cap).
Excess: groups kept beyond `target_groups` in the last round are dropped (first come, first kept), as DAPO does;
nothing is carried over to the next step, because a carried group would be trained one policy update later than it
was sampled (off-policy) and would make a step's batch depend on the previous step's luck.
Cap hit with fewer than `target_groups` groups (`on_cap`):
- "train_smaller": train on what was kept;
- "top_up": fill the gap with groups generated during this step that were not kept, in generation order: first the
  groups that passed the accuracy filter but were dropped by LSPO (they still carry a gradient), then — only when
  `top_up_with_zero_advantage=True` — groups dropped by the accuracy filter (their advantages are all zero: they only
  dilute a token-mean loss). If the reserve runs out the batch stays smaller.
Either way a `DynamicSamplingCapWarning` says what happened and the metrics carry `cap_hit`, `shortfall` and the
top-up counts. An empty batch is returned (not raised) when nothing usable was generated; the trainer must skip
that step. The loop never runs more than `max_rounds` rounds, so it cannot stall.

Which rewards to pass: the ones the advantages will be computed from (after any overlong penalty, see
`overlong.py`), because "all equal" is exactly the condition for all-zero group-relative advantages.

Across ranks: the decision runs once, on global rank 0 (`rank0.decide_on_rank0(fill_batch, ...)`), and the kept
payloads (make them sample ids, not tensors) are broadcast, so every rank trains on the same batch (docs/design.md,
contract 3).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Literal, Sequence

import torch

from megatron_rl.algorithms.lspo import (
    LengthQuantiles,
    LSPOConfig,
    group_mean_lengths,
    lspo_keep_mask,
)
from megatron_rl.errors import FieldError

_invalid = partial(FieldError, section="dynamic_sampling")  # a bad field of this section's config

OnCap = Literal["train_smaller", "top_up"]
_ON_CAP = ("train_smaller", "top_up")

# Where a group of the final batch came from (FilledBatch.sources).
KEPT = "kept"
TOP_UP_LSPO = "top_up_lspo_dropped"
TOP_UP_ZERO_ADVANTAGE = "top_up_zero_advantage"


class DynamicSamplingCapWarning(UserWarning):
    """The generation-round cap was reached before the batch was full."""


@dataclass(frozen=True)
class DynamicSamplingConfig:
    """Accuracy filter and over-sampling settings.

    accuracy_filter: drop groups whose rewards are all equal (DAPO). False + LSPO = the "length only" ablation.
    reward_equal_atol: rewards within this absolute spread count as equal (0.0 = exact, as DAPO's std == 0).
    max_rounds: cap on generation rounds per training step (>= 1; DAPO/verl call it max_num_gen_batches).
    on_cap: "train_smaller" or "top_up" when the cap is hit before the batch is full (module docstring).
    top_up_with_zero_advantage: let "top_up" use accuracy-filtered (all-equal-reward) groups as a last resort.
    """

    accuracy_filter: bool = True
    reward_equal_atol: float = 0.0
    max_rounds: int = 8
    on_cap: OnCap = "train_smaller"
    top_up_with_zero_advantage: bool = False

    def __post_init__(self):
        for flag in ("accuracy_filter", "top_up_with_zero_advantage"):
            if not isinstance(getattr(self, flag), bool):
                raise _invalid(flag, f"must be True or False, got {getattr(self, flag)!r}")
        if isinstance(self.max_rounds, bool) or not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise _invalid('max_rounds', f"must be an int >= 1, got {self.max_rounds!r}")
        if self.on_cap not in _ON_CAP:
            raise _invalid('on_cap', f"must be one of {_ON_CAP}, got {self.on_cap!r}")
        atol = self.reward_equal_atol
        if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not (atol >= 0 and math.isfinite(atol)):
            raise _invalid('reward_equal_atol', f"must be a finite number >= 0, got {atol!r}")
        if self.top_up_with_zero_advantage and self.on_cap != "top_up":
            raise _invalid("top_up_with_zero_advantage",
                           f"true only has an effect with on_cap='top_up', got on_cap={self.on_cap!r}")


@dataclass(frozen=True)
class GroupOutcome:
    """One prompt's group as the filters see it: per response its reward and its length in tokens.

    payload is opaque to this module (the caller's handle on the samples, e.g. their ids).
    """

    rewards: tuple[float, ...]
    response_lengths: tuple[int, ...]
    payload: Any = None

    def __post_init__(self):
        rewards = _as_tuple(self.rewards, "rewards")
        lengths = _as_tuple(self.response_lengths, "response_lengths")
        if len(rewards) == 0:
            raise ValueError("GroupOutcome.rewards is empty: a group needs at least one response")
        if len(rewards) != len(lengths):
            raise ValueError(
                f"GroupOutcome.rewards has {len(rewards)} entries but response_lengths has {len(lengths)}: "
                "give one reward and one length per response"
            )
        try:
            rewards = tuple(float(r) for r in rewards)
        except (TypeError, ValueError):
            raise TypeError(f"GroupOutcome.rewards must be numbers (one per response), got {rewards}") from None
        if not all(math.isfinite(r) for r in rewards):
            raise ValueError(f"GroupOutcome.rewards must be finite, got {rewards}")
        for x in lengths:
            if isinstance(x, (bool, str)) or not _is_count(x):
                raise ValueError(f"GroupOutcome.response_lengths must be token counts >= 0, got {lengths}")
        object.__setattr__(self, "rewards", rewards)
        object.__setattr__(self, "response_lengths", tuple(int(x) for x in lengths))


def _is_count(x) -> bool:
    try:
        return float(x).is_integer() and x >= 0
    except (TypeError, ValueError, OverflowError):
        return False


def _as_tuple(values, name: str) -> tuple:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"GroupOutcome.{name} must be 1-D, got shape {tuple(values.shape)}")
        return tuple(values.tolist())
    if isinstance(values, (str, bytes, Mapping)):
        raise TypeError(f"GroupOutcome.{name} must be a sequence of numbers (one per response), got {values!r}")
    try:
        return tuple(values)
    except TypeError:
        raise TypeError(f"GroupOutcome.{name} must be a sequence, got {type(values).__name__}") from None


def reward_variance_mask(groups: Sequence[GroupOutcome], atol: float = 0.0) -> torch.Tensor:
    """DAPO accuracy filter: True for groups whose rewards are not all equal (max - min > atol)."""
    return torch.tensor([max(g.rewards) - min(g.rewards) > atol for g in groups], dtype=torch.bool)


@dataclass(frozen=True)
class RoundSelection:
    """The filters' verdict on one generation round (masks are per group, in generation order)."""

    passed_accuracy: torch.Tensor  # bool [n]; all True when the accuracy filter is off
    kept: torch.Tensor  # bool [n]; passed_accuracy & passed LSPO
    mean_lengths: torch.Tensor  # float64 [n], L(q)
    quantiles: LengthQuantiles | None  # None when LSPO is off or no group reached it


def select_round(
    groups: Sequence[GroupOutcome], sampling: DynamicSamplingConfig, lspo: LSPOConfig | None = None
) -> RoundSelection:
    """Apply the accuracy filter, then LSPO over the groups that passed it (the paper's order)."""
    n = len(groups)
    if sampling.accuracy_filter:
        passed = reward_variance_mask(groups, sampling.reward_equal_atol)
    else:
        passed = torch.ones(n, dtype=torch.bool)
    mean_lengths = group_mean_lengths([g.response_lengths for g in groups]) if n else torch.zeros(0, dtype=torch.float64)
    kept = passed.clone()
    quantiles = None
    if lspo is not None and lspo.enabled:
        candidates = passed.nonzero().flatten()
        keep_candidates, quantiles = lspo_keep_mask(mean_lengths[candidates], lspo)
        kept[candidates] = keep_candidates
    return RoundSelection(passed_accuracy=passed, kept=kept, mean_lengths=mean_lengths, quantiles=quantiles)


@dataclass(frozen=True)
class RoundStats:
    """Counts of one generation round and its LSPO thresholds (None when LSPO did not run on it)."""

    round_index: int
    prompts: int
    passed_accuracy: int
    kept: int
    quantiles: LengthQuantiles | None


@dataclass(frozen=True)
class SamplingMetrics:
    """What one training step's dynamic sampling did; `as_dict()` gives flat floats for the logger.

    prompts_generated: groups produced over all rounds; dropped_accuracy / dropped_lspo: removed by each filter;
    kept_accuracy: passed the accuracy filter; kept_lspo: passed both filters (== kept_accuracy without LSPO);
    excess_dropped: kept groups beyond target_groups, dropped; topped_up_*: groups added by on_cap="top_up";
    shortfall: target_groups - final_groups (>= 0); q_*: LSPO thresholds averaged over the rounds where LSPO ran
    (NaN when it never did); mean_length_*: mean L(q) over all generated groups / over the final batch.
    """

    target_groups: int
    rounds_used: int
    max_rounds: int
    cap_hit: bool
    prompts_generated: int
    responses_generated: int
    kept_accuracy: int
    dropped_accuracy: int
    kept_lspo: int
    dropped_lspo: int
    excess_dropped: int
    topped_up_lspo_dropped: int
    topped_up_zero_advantage: int
    final_groups: int
    shortfall: int
    q_low: float
    q_high: float
    q_max: float
    mean_length_generated: float
    mean_length_final: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class FilledBatch:
    """The step's training groups (generation order; kept groups first, then any top-up) and how they were found."""

    groups: list[GroupOutcome]
    sources: list[str]  # per group: KEPT, TOP_UP_LSPO or TOP_UP_ZERO_ADVANTAGE
    metrics: SamplingMetrics
    rounds: list[RoundStats] = field(default_factory=list)

    @property
    def payloads(self) -> list[Any]:
        return [g.payload for g in self.groups]


def fill_batch(
    generate_round: Callable[[int], Sequence[GroupOutcome]],
    target_groups: int,
    sampling: DynamicSamplingConfig,
    lspo: LSPOConfig | None = None,
) -> FilledBatch:
    """Generate rounds until `target_groups` groups pass the filters or `sampling.max_rounds` rounds ran.

    generate_round(round_index) returns one round: a sequence of GroupOutcome (one per prompt). Policies for
    excess, cap and top-up: see the module docstring. Warns `DynamicSamplingCapWarning` when the cap is hit.
    """
    if isinstance(target_groups, bool) or not isinstance(target_groups, int) or target_groups < 1:
        raise ValueError(f"target_groups must be an int >= 1 (prompts per training batch), got {target_groups!r}")
    if not callable(generate_round):
        raise TypeError(f"generate_round must be callable (round_index -> groups), got {type(generate_round).__name__}")
    if not isinstance(sampling, DynamicSamplingConfig):
        raise TypeError(f"sampling must be a DynamicSamplingConfig, got {type(sampling).__name__}")
    if lspo is not None and not isinstance(lspo, LSPOConfig):
        raise TypeError(f"lspo must be an LSPOConfig or None (no length filter), got {type(lspo).__name__}")

    kept: list[GroupOutcome] = []
    lspo_reserve: list[GroupOutcome] = []  # passed the accuracy filter, dropped by LSPO
    zero_adv_reserve: list[GroupOutcome] = []  # dropped by the accuracy filter
    rounds: list[RoundStats] = []
    all_lengths: list[torch.Tensor] = []
    responses = 0
    for round_index in range(sampling.max_rounds):
        groups = _round_groups(generate_round(round_index), round_index)
        for i, g in enumerate(groups):
            if not isinstance(g, GroupOutcome):
                raise TypeError(
                    f"generate_round({round_index}) returned a {type(g).__name__} at position {i}; "
                    "it must return GroupOutcome objects (one per prompt)"
                )
        selection = select_round(groups, sampling, lspo)
        for g, passed, keep in zip(groups, selection.passed_accuracy.tolist(), selection.kept.tolist()):
            (kept if keep else lspo_reserve if passed else zero_adv_reserve).append(g)
        responses += sum(len(g.rewards) for g in groups)
        all_lengths.append(selection.mean_lengths)
        rounds.append(
            RoundStats(
                round_index=round_index,
                prompts=len(groups),
                passed_accuracy=int(selection.passed_accuracy.sum()),
                kept=int(selection.kept.sum()),
                quantiles=selection.quantiles,
            )
        )
        if len(kept) >= target_groups:
            break

    n_kept = len(kept)
    cap_hit = n_kept < target_groups
    final = kept[:target_groups]
    sources = [KEPT] * len(final)
    excess = n_kept - len(final)
    from_lspo = from_zero = 0
    if cap_hit and sampling.on_cap == "top_up":
        from_lspo = min(target_groups - len(final), len(lspo_reserve))
        final += lspo_reserve[:from_lspo]
        sources += [TOP_UP_LSPO] * from_lspo
        if sampling.top_up_with_zero_advantage:
            from_zero = min(target_groups - len(final), len(zero_adv_reserve))
            final += zero_adv_reserve[:from_zero]
            sources += [TOP_UP_ZERO_ADVANTAGE] * from_zero

    generated_lengths = torch.cat(all_lengths)
    final_lengths = group_mean_lengths([g.response_lengths for g in final]) if final else torch.zeros(0)
    lspo_rounds = [r.quantiles for r in rounds if r.quantiles is not None]
    passed_accuracy = sum(r.passed_accuracy for r in rounds)
    prompts = sum(r.prompts for r in rounds)
    metrics = SamplingMetrics(
        target_groups=target_groups,
        rounds_used=len(rounds),
        max_rounds=sampling.max_rounds,
        cap_hit=cap_hit,
        prompts_generated=prompts,
        responses_generated=responses,
        kept_accuracy=passed_accuracy,
        dropped_accuracy=prompts - passed_accuracy,
        kept_lspo=n_kept,
        dropped_lspo=passed_accuracy - n_kept,
        excess_dropped=excess,
        topped_up_lspo_dropped=from_lspo,
        topped_up_zero_advantage=from_zero,
        final_groups=len(final),
        shortfall=target_groups - len(final),
        q_low=_mean_or_nan([q.low for q in lspo_rounds]),
        q_high=_mean_or_nan([q.high for q in lspo_rounds]),
        q_max=_mean_or_nan([q.max for q in lspo_rounds]),
        mean_length_generated=_mean_or_nan(generated_lengths.tolist()),
        mean_length_final=_mean_or_nan(final_lengths.tolist()),
    )
    if cap_hit:
        warnings.warn(cap_message(metrics, sampling), DynamicSamplingCapWarning, stacklevel=2)
    return FilledBatch(groups=final, sources=sources, metrics=metrics, rounds=rounds)


def _round_groups(returned, round_index: int) -> list:
    """The round's groups as a list; anything but a sequence of groups is a clear error, not a crash later."""
    if isinstance(returned, (GroupOutcome, str, bytes, Mapping)) or not isinstance(returned, Iterable):
        raise TypeError(
            f"generate_round({round_index}) returned {type(returned).__name__}; it must return a list of GroupOutcome "
            "(one per prompt; an empty list when nothing was generated)"
        )
    return list(returned)


def _mean_or_nan(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def cap_message(m: SamplingMetrics, sampling: DynamicSamplingConfig) -> str:
    if m.final_groups == 0:
        outcome = "the batch is EMPTY and the trainer must skip this step"
    elif m.topped_up_lspo_dropped or m.topped_up_zero_advantage:
        outcome = (
            f"topped up with {m.topped_up_lspo_dropped} LSPO-dropped and {m.topped_up_zero_advantage} "
            f"zero-advantage groups to {m.final_groups}"
        )
    else:
        outcome = f"training on a smaller batch of {m.final_groups} groups"
    if m.shortfall and m.final_groups:
        outcome += f" ({m.shortfall} short)"
    return (
        f"dynamic sampling hit the cap of {sampling.max_rounds} generation rounds "
        f"(dynamic_sampling.max_rounds) with {m.kept_lspo} of the {m.target_groups} groups the batch needs "
        f"({m.prompts_generated} prompts generated, {m.dropped_accuracy} dropped by the accuracy filter, "
        f"{m.dropped_lspo} by LSPO); {outcome}. Raise max_rounds, generate more prompts per round, "
        "or relax the filters."
    )
