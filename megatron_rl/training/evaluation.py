"""Validation accuracy: avg@n, pass@k and mean response length of sampled responses, through the rollout pool.

The evaluator depends on two callables only, so it runs the same with the vLLM rollout pool, a test double or
anything else that generates:

    generate_fn(prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]
        (one list of ``sampling.n`` completions per prompt, in prompt order; types in megatron_rl/rollout/types.py)
    reward_pool.score(list[RewardItem]) -> (scores, RewardMetrics)       (megatron_rl.rewards.RewardPool)

A sample is *correct* when its reward exceeds ``correct_threshold`` (0.5: the built-in rewards are 0/1, and the
math reward with a format bonus w < 0.5 keeps a wrong answer below and a right one above).

Metrics (n = sampling.n, c_i = correct samples of prompt i, N prompts):
    avg@n    = mean_i c_i / n                    (mean accuracy over all samples; unbiased pass@1)
    pass@k   = mean_i [1 - C(n - c_i, k) / C(n, k)]   for each requested k <= n, the unbiased estimator of
               Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv 2107.03374, eq. (1)
    mean_response_length = mean tokens per sample; truncated_frac = share of samples that hit max_tokens.
With more than one data_source in the set, avg@n and pass@k are also reported per source.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from megatron_rl.data.config import PromptDataConfig
from megatron_rl.data.dataset import PromptDataset, PromptExample, build_prompt_dataset
from megatron_rl.rewards.pool import RewardPool
from megatron_rl.rewards.types import RewardItem, RewardMetrics
from megatron_rl.rollout.types import Completion, SamplingConfig

logger = logging.getLogger(__name__)

GenerateFn = Callable[[list[list[int]], SamplingConfig], list[list[Completion]]]


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples with c correct (Chen et al. 2021, arXiv 2107.03374):
    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1..n} (1 - k/i) for numerical stability (their Fig. 3).
    """
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"pass@k needs 0 <= num_correct <= num_samples, got c={num_correct}, n={num_samples}")
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={num_samples}")
    if num_samples - num_correct < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1)))


@dataclass
class PromptEvalRecord:
    """Per-prompt outcome (one line of the samples file written by run_evaluation)."""

    row: int
    data_source: str
    ground_truth: str
    num_samples: int
    num_correct: int
    mean_score: float
    mean_response_length: float
    responses: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    records: list[PromptEvalRecord]
    reward_metrics: RewardMetrics


def check_pass_ks(pass_ks: Sequence[int], n: int) -> list[int]:
    """The distinct k values, sorted; a ValueError when one is outside 1..n (pass@k needs k <= n samples)."""
    bad = [k for k in pass_ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"eval pass@k needs 1 <= k <= sampling.n={n}; got k={bad}. Raise sampling.n or drop them")
    return sorted(set(pass_ks))


def _generate(generate_fn: GenerateFn, batch: list[PromptExample], sampling: SamplingConfig) -> list[list[Completion]]:
    outputs = generate_fn([example.prompt_token_ids for example in batch], sampling)
    if len(outputs) != len(batch):
        raise RuntimeError(f"generate_fn returned {len(outputs)} completion lists for {len(batch)} prompts")
    for position, completions in enumerate(outputs):
        if len(completions) != sampling.n:
            raise RuntimeError(f"generate_fn returned {len(completions)} completions for prompt {position}, "
                               f"expected sampling.n={sampling.n}")
        if any(c.prompt_index != position for c in completions):
            raise RuntimeError(f"generate_fn returned completions with prompt_index "
                               f"{sorted({c.prompt_index for c in completions})} in slot {position}: outputs must "
                               f"be in request order")
    return outputs


def _group_metrics(records: list[PromptEvalRecord], n: int, pass_ks: list[int], prefix: str) -> dict[str, float]:
    correct = [r.num_correct for r in records]
    metrics = {f"{prefix}avg@{n}": float(np.mean([c / n for c in correct]))}
    for k in pass_ks:
        metrics[f"{prefix}pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for c in correct]))
    return metrics


def evaluate(
    generate_fn: GenerateFn,
    dataset: PromptDataset | Sequence[PromptExample],
    reward_pool: RewardPool,
    sampling: SamplingConfig,
    *,
    pass_ks: Sequence[int] = (1,),
    batch_size: int = 64,
    correct_threshold: float = 0.5,
    keep_responses: bool = False,
    prefix: str = "eval/",
) -> EvalResult:
    """Sample ``sampling.n`` responses per prompt, score them, and return the metrics described above."""
    pass_ks = check_pass_ks(pass_ks, sampling.n)
    if batch_size < 1:
        raise ValueError(f"eval batch_size must be >= 1, got {batch_size}")
    examples = list(dataset)
    if not examples:
        raise ValueError("evaluation dataset is empty")
    records: list[PromptEvalRecord] = []
    reward_metrics = RewardMetrics()
    lengths: list[int] = []
    truncated = 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        outputs = _generate(generate_fn, batch, sampling)
        items = [RewardItem(c.text, example.ground_truth, example.data_source, example.extra_info)
                 for example, completions in zip(batch, outputs) for c in completions]
        scores, batch_metrics = reward_pool.score(items)
        reward_metrics = reward_metrics.merge(batch_metrics)
        for position, (example, completions) in enumerate(zip(batch, outputs)):
            own = scores[position * sampling.n:(position + 1) * sampling.n]
            own_lengths = [len(c.token_ids) for c in completions]
            lengths.extend(own_lengths)
            truncated += sum(c.truncated for c in completions)
            records.append(PromptEvalRecord(
                row=example.row, data_source=example.data_source, ground_truth=example.ground_truth,
                num_samples=sampling.n, num_correct=sum(s > correct_threshold for s in own),
                mean_score=float(np.mean(own)), mean_response_length=float(np.mean(own_lengths)),
                responses=[c.text for c in completions] if keep_responses else [],
                scores=list(own) if keep_responses else [],
            ))
    metrics = _group_metrics(records, sampling.n, pass_ks, prefix)
    metrics.update({
        f"{prefix}mean_score": float(np.mean([r.mean_score for r in records])),
        f"{prefix}mean_response_length": float(np.mean(lengths)),
        f"{prefix}truncated_frac": truncated / len(lengths),
        f"{prefix}num_prompts": float(len(records)),
    })
    by_source: dict[str, list[PromptEvalRecord]] = defaultdict(list)
    for record in records:
        by_source[record.data_source or "unknown"].append(record)
    if len(by_source) > 1:
        for source, group in sorted(by_source.items()):
            metrics.update(_group_metrics(group, sampling.n, pass_ks, f"{prefix}{source}/"))
    metrics.update(reward_metrics.to_dict(prefix=f"{prefix}reward/"))
    return EvalResult(metrics, records, reward_metrics)


def format_metrics(metrics: dict[str, float]) -> str:
    """Aligned "name  value" lines for a terminal."""
    width = max((len(name) for name in metrics), default=0)
    return "\n".join(f"{name:<{width}}  {value:.4f}" for name, value in metrics.items())


def run_evaluation(
    data: PromptDataConfig | PromptDataset,
    tokenizer: Any,
    generate_fn: GenerateFn,
    sampling: SamplingConfig,
    *,
    reward_fn: str = "default",
    reward_fn_kwargs: dict[str, Any] | None = None,
    reward_workers: int = 2,
    reward_timeout_s: float = 10.0,
    pass_ks: Sequence[int] = (1,),
    batch_size: int = 64,
    output_dir: str | Path | None = None,
) -> EvalResult:
    """Everything ``megatron-rl eval`` needs after it has built ``generate_fn``: validates the settings, reads
    the data (``data`` may also be a dataset already built with ``tokenizer``), starts and stops a reward pool,
    evaluates, logs the table and (with ``output_dir``) writes ``eval_metrics.json`` and ``eval_samples.jsonl``
    (one PromptEvalRecord per prompt, with its responses)."""
    check_pass_ks(pass_ks, sampling.n)
    dataset = data if isinstance(data, PromptDataset) else build_prompt_dataset(data, tokenizer)
    with RewardPool(reward_fn, reward_workers, reward_timeout_s, fn_kwargs=reward_fn_kwargs) as pool:
        result = evaluate(generate_fn, dataset, pool, sampling, pass_ks=pass_ks, batch_size=batch_size,
                          keep_responses=output_dir is not None)
    logger.info("evaluation of %s\n%s", dataset.report.summary(), format_metrics(result.metrics))
    if output_dir is not None:
        output = Path(output_dir)
        output.mkdir(parents=True, exist_ok=True)
        (output / "eval_metrics.json").write_text(json.dumps(result.metrics, indent=2) + "\n")
        with open(output / "eval_samples.jsonl", "w", encoding="utf-8") as samples:
            for record in result.records:
                samples.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
    return result
