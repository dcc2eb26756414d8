"""LSPO: length-aware dynamic sampling (Chen, Koenig, Dilkina, "LSPO: Length-aware Dynamic Sampling for Policy
Optimization in LLM Reasoning", arXiv 2510.01459, Sec. 3).

For a prompt q with G responses o_1..o_G the paper defines its mean response length

    L(q) = (1/G) * sum_i |o_i|

and, over the prompts of the current batch, the empirical CDF F(t) = Pr[L(q) <= t] and the quantile function

    Q(a) = inf { t : F(t) >= a },   a in (0, 1].

A prompt is kept iff

    L(q) <= Q(L_low)   or   Q(L_high) <= L(q) <= Q(L_max)          (reported defaults 0.30 / 0.65 / 0.95)

i.e. the short tail and the long tail without the very longest prompts. The paper applies the rule after the DAPO
accuracy filter (groups with identical rewards removed first) and recomputes the thresholds for every generated
batch; `dynamic_sampling.select_round` does exactly that, one generation round at a time.

Quantile definition (`quantile_method`):
- "inverted_cdf" (default; the paper's Q above): with the n values sorted ascending x_(1) <= ... <= x_(n),
  Q(a) = x_(k) with k = ceil(n * a) (1-based), so Q is always one of the batch's own values. Equivalent to
  `numpy.quantile(x, a, method="inverted_cdf")`. n * a is rounded to 9 decimals before the ceil so that float
  noise (25 * 0.28 == 7.000000000000001) does not move the threshold by a whole rank.
- "linear": `torch.quantile(..., interpolation="linear")` (numpy's default), for matching other implementations.

Consequences of the inclusive comparisons, all covered by tests/unit/algorithms/test_lspo_quantiles.py:
- ties at a threshold are all kept (the kept fraction can exceed L_low + (L_max - L_high));
- all lengths equal: every threshold equals that length, so every prompt is kept (there is no length signal);
- tiny batches with the defaults and "inverted_cdf": n = 1..4 keep everything (for n = 3: Q(.3) = x_(1),
  Q(.65) = x_(2), Q(.95) = x_(3)); n = 5 drops only the median; L_max removes something only from n >= 20;
- with "inverted_cdf" the short band always holds the minimum and the long band always holds x_(ceil(n L_high)),
  so a non-empty batch never loses every prompt; with "linear" and keep="long" it can (n = 2: the band
  [x1 + .65 (x2 - x1), x1 + .95 (x2 - x1)] contains neither value).
- an empty batch (e.g. the accuracy filter removed everything) yields an empty mask and no quantiles.

Ablation switches (paper Sec. 5): `keep="short"` / `keep="long"` keep one band only; "length only" (no accuracy
filter first) is `DynamicSamplingConfig(accuracy_filter=False)` with LSPO enabled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal, Sequence

import torch

from megatron_rl.errors import FieldError

_invalid = partial(FieldError, section="lspo")  # a bad field of this section's config

QuantileMethod = Literal["inverted_cdf", "linear"]
KeepBands = Literal["both", "short", "long"]
_QUANTILE_METHODS = ("inverted_cdf", "linear")
_KEEP_BANDS = ("both", "short", "long")


@dataclass(frozen=True)
class LSPOConfig:
    """LSPO thresholds (as quantile levels in (0, 1]) and ablation switches; see the module docstring.

    enabled: apply the length filter at all (lets a YAML tree switch it off without removing the block).
    low_quantile / high_quantile / max_quantile: L_low, L_high, L_max of the paper (0.30 / 0.65 / 0.95).
    keep: "both" (LSPO), "short" (L <= Q(L_low) only) or "long" (Q(L_high) <= L <= Q(L_max) only).
    quantile_method: "inverted_cdf" (the paper's inf{t : F(t) >= a}) or "linear" (torch.quantile).
    """

    enabled: bool = True
    low_quantile: float = 0.30
    high_quantile: float = 0.65
    max_quantile: float = 0.95
    keep: KeepBands = "both"
    quantile_method: QuantileMethod = "inverted_cdf"

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise _invalid('enabled', f"must be True or False, got {self.enabled!r}")
        for name in ("low_quantile", "high_quantile", "max_quantile"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise _invalid(name, f"must be a number in (0, 1], got {value!r}")
        if not self.low_quantile <= self.high_quantile <= self.max_quantile:
            raise _invalid("high_quantile",
                           "must satisfy low_quantile <= high_quantile <= max_quantile, got "
                           f"{self.low_quantile} / {self.high_quantile} / {self.max_quantile} (paper defaults "
                           "0.30 / 0.65 / 0.95)")
        if self.keep not in _KEEP_BANDS:
            raise _invalid('keep', f"must be one of {_KEEP_BANDS}, got {self.keep!r}")
        if self.quantile_method not in _QUANTILE_METHODS:
            raise _invalid('quantile_method', f"must be one of {_QUANTILE_METHODS}, got {self.quantile_method!r}")


@dataclass(frozen=True)
class LengthQuantiles:
    """The three thresholds Q(L_low), Q(L_high), Q(L_max) of one batch, in tokens."""

    low: float
    high: float
    max: float


def group_mean_lengths(response_lengths: Sequence[Sequence[int]]) -> torch.Tensor:
    """L(q) for each group: the mean of its responses' lengths in tokens (float64, shape [n_groups])."""
    means = []
    for i, lengths in enumerate(response_lengths):
        if len(lengths) == 0:
            raise ValueError(f"response_lengths[{i}] is empty: every group needs at least one response")
        means.append(math.fsum(float(x) for x in lengths) / len(lengths))
    return torch.tensor(means, dtype=torch.float64)


def _inverted_cdf_rank(n: int, level: float) -> int:
    """0-based index k - 1 of x_(k), k = ceil(n * level), with n * level rounded to 9 decimals first."""
    k = math.ceil(round(n * level, 9))
    return min(max(k, 1), n) - 1


def empirical_quantiles(values: torch.Tensor, levels: Sequence[float], method: QuantileMethod = "inverted_cdf"):
    """Quantiles of a non-empty 1-D tensor at each level in (0, 1]; float64 tensor of len(levels).

    "inverted_cdf": Q(a) = inf{t : F(t) >= a} = x_(ceil(n a)) (arXiv 2510.01459, Sec. 3).
    "linear": torch.quantile with linear interpolation.
    """
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"values must be a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError("values must be finite (a NaN or inf length reached the quantile)")
    for level in levels:
        if not 0.0 < level <= 1.0:
            raise ValueError(f"quantile level must be in (0, 1], got {level}")
    x = values.to(torch.float64)
    if method == "inverted_cdf":
        ordered = torch.sort(x).values
        return torch.stack([ordered[_inverted_cdf_rank(x.numel(), level)] for level in levels])
    if method == "linear":
        return torch.quantile(x, torch.tensor(list(levels), dtype=torch.float64), interpolation="linear")
    raise ValueError(f"quantile method must be one of {_QUANTILE_METHODS}, got {method!r}")


def lspo_keep_mask(mean_lengths: torch.Tensor, config: LSPOConfig) -> tuple[torch.Tensor, LengthQuantiles | None]:
    """Which prompts LSPO keeps, given each prompt's mean response length L(q) over one batch.

    Returns (keep, quantiles): keep is a bool tensor shaped like mean_lengths; quantiles is None for an empty
    batch or a disabled config (then everything is kept).
    """
    if mean_lengths.dim() != 1:
        raise ValueError(f"mean_lengths must be 1-D (one L(q) per prompt), got shape {tuple(mean_lengths.shape)}")
    n = mean_lengths.numel()
    if not config.enabled or n == 0:
        return torch.ones(n, dtype=torch.bool), None
    q_low, q_high, q_max = empirical_quantiles(
        mean_lengths, (config.low_quantile, config.high_quantile, config.max_quantile), config.quantile_method
    ).tolist()
    lengths = mean_lengths.to(torch.float64)
    short = lengths <= q_low
    long = (lengths >= q_high) & (lengths <= q_max)
    keep = {"both": short | long, "short": short, "long": long}[config.keep]
    return keep, LengthQuantiles(low=q_low, high=q_high, max=q_max)
