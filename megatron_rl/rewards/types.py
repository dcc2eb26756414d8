"""What goes into the reward pool (one item per response) and what comes out besides the scores (metrics)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# How many timeout/error messages a RewardMetrics keeps verbatim (the counts are always complete).
MAX_PROBLEM_EXAMPLES = 10


@dataclass(frozen=True)
class RewardItem:
    """One response to score against its prompt's ground truth.

    data_source and extra_info come from the dataset row (DAPO layout); they reach the reward function only
    when it declares parameters of those names (or ``**kwargs``).
    """

    response: str
    ground_truth: str
    data_source: str = ""
    extra_info: dict[str, Any] | None = None


@dataclass
class RewardMetrics:
    """Counts for one or more ``RewardPool.score`` calls. Timeouts and errors scored 0 and are counted here.

    num_timeouts: calls that ran past the per-call timeout (soft interrupt or hard kill);
    num_errors: calls that raised, returned a non-finite/non-number value, or whose worker died;
    num_worker_restarts: worker processes killed (hard timeout) or found dead, and replaced.
    """

    num_items: int = 0
    num_timeouts: int = 0
    num_errors: int = 0
    num_worker_restarts: int = 0
    score_sum: float = 0.0
    wall_s: float = 0.0
    max_call_s: float = 0.0
    problem_examples: list[str] = field(default_factory=list)

    @property
    def mean_score(self) -> float:
        return self.score_sum / self.num_items if self.num_items else 0.0

    def record_problem(self, message: str) -> None:
        if len(self.problem_examples) < MAX_PROBLEM_EXAMPLES:
            self.problem_examples.append(message)

    def merge(self, other: RewardMetrics) -> RewardMetrics:
        """Metrics of both calls together (e.g. the several generation rounds of one dynamic-sampling step)."""
        return RewardMetrics(
            num_items=self.num_items + other.num_items,
            num_timeouts=self.num_timeouts + other.num_timeouts,
            num_errors=self.num_errors + other.num_errors,
            num_worker_restarts=self.num_worker_restarts + other.num_worker_restarts,
            score_sum=self.score_sum + other.score_sum,
            wall_s=self.wall_s + other.wall_s,
            max_call_s=max(self.max_call_s, other.max_call_s),
            problem_examples=(self.problem_examples + other.problem_examples)[:MAX_PROBLEM_EXAMPLES],
        )

    def to_dict(self, prefix: str = "reward/") -> dict[str, float]:
        """Scalars for the logger: reward/num_timeouts, reward/num_errors, reward/mean_score, ..."""
        return {
            f"{prefix}num_items": float(self.num_items),
            f"{prefix}num_timeouts": float(self.num_timeouts),
            f"{prefix}num_errors": float(self.num_errors),
            f"{prefix}num_worker_restarts": float(self.num_worker_restarts),
            f"{prefix}mean_score": self.mean_score,
            f"{prefix}wall_s": self.wall_s,
            f"{prefix}max_call_s": self.max_call_s,
        }
