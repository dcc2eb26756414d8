"""The evaluator: pass@k against brute-force enumeration, and avg@n / pass@k / length metrics through a real
reward pool with a scripted generate_fn (the rollout pool's stand-in; the evaluator is what is under test)."""
import itertools
import json
import math
import re

import numpy as np
import pytest

from megatron_rl.data import PromptDataConfig, build_prompt_dataset
from megatron_rl.data.synthetic import write_synthetic_dataset
from megatron_rl.training.evaluation import evaluate, format_metrics, pass_at_k, run_evaluation
from megatron_rl.rewards import RewardPool
from megatron_rl.rollout.types import Completion, SamplingConfig
from tests.unit.data.tiny_tokenizer import make_tiny_tokenizer


def brute_force_pass_at_k(n, c, k):
    """Share of all k-subsets of n samples (c of them correct) that contain a correct one."""
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    return sum(any(subset) for subset in subsets) / len(subsets)


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                # float products vs exact counting: agree to rounding of at most n multiplications
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is plain accuracy
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 101, 100) == 1.0
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 5), (4, 2, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


N_SAMPLES = 4


class ScriptedArithmeticModel:
    """Answers "What is a+b?": the prompt at position p of the dataset gets p % (n+1) correct samples out of n,
    the others a wrong answer; every third sample is cut at max_tokens. Records what it was asked."""

    def __init__(self, tokenizer, position_of_prompt):
        self.tokenizer = tokenizer
        self.position_of_prompt = position_of_prompt
        self.requests = []

    def num_correct(self, position):
        return position % (N_SAMPLES + 1)

    def response(self, position, sample, truth):
        return f"Answer: {truth}" if sample < self.num_correct(position) else f"Answer: {truth}1"

    def __call__(self, prompt_token_ids, sampling):
        self.requests.append((len(prompt_token_ids), sampling))
        outputs = []
        for slot, ids in enumerate(prompt_token_ids):
            text = self.tokenizer.decode(ids)
            a, b = map(int, re.search(r"What is (\d+)\+(\d+)\?", text).groups())
            position = self.position_of_prompt[tuple(ids)]
            completions = []
            for sample in range(sampling.n):
                response = self.response(position, sample, a + b)
                tokens = self.tokenizer(response, add_special_tokens=False)["input_ids"]
                completions.append(Completion(slot, sample, list(ids), tokens, [0.0] * len(tokens), response,
                                              "length" if sample % 3 == 2 else "stop"))
            outputs.append(completions)
        return outputs


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def arithmetic_val(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("eval")
    path = write_synthetic_dataset(directory / "val.parquet", "arithmetic", 23, seed=11, difficulty=1, split="val")
    return PromptDataConfig(path=str(path), cache_dir=str(directory / "cache"))


@pytest.fixture(scope="module")
def reward_pool():
    with RewardPool("default", num_workers=1, timeout_s=10) as pool:
        yield pool


def scripted_model(dataset, tokenizer):
    # dataset prompts may repeat (100 distinct level-1 problems): key by ids, keep the first position
    positions = {}
    for position, example in enumerate(dataset):
        positions.setdefault(tuple(example.prompt_token_ids), position)
    return ScriptedArithmeticModel(tokenizer, positions)


def test_metrics_match_an_independent_count(arithmetic_val, tokenizer, reward_pool):
    dataset = build_prompt_dataset(arithmetic_val, tokenizer)
    model = scripted_model(dataset, tokenizer)
    sampling = SamplingConfig(n=N_SAMPLES, temperature=1.0, max_tokens=8)
    result = evaluate(model, dataset, reward_pool, sampling, pass_ks=(1, 2, 4), batch_size=5)

    correct = [model.num_correct(model.position_of_prompt[tuple(e.prompt_token_ids)]) for e in dataset]
    assert [r.num_correct for r in result.records] == correct
    metrics = result.metrics
    assert metrics["eval/avg@4"] == pytest.approx(np.mean(correct) / N_SAMPLES)
    for k in (1, 2, 4):
        assert metrics[f"eval/pass@{k}"] == pytest.approx(np.mean([brute_force_pass_at_k(4, c, k) for c in correct]))
    assert metrics["eval/pass@1"] == pytest.approx(metrics["eval/avg@4"])
    responses = [model.response(model.position_of_prompt[tuple(e.prompt_token_ids)], s, int(e.ground_truth))
                 for e in dataset for s in range(N_SAMPLES)]
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]
    assert metrics["eval/mean_response_length"] == pytest.approx(np.mean(lengths))
    assert metrics["eval/truncated_frac"] == pytest.approx(1 / 4)  # sample 2 of every 4
    assert metrics["eval/num_prompts"] == len(dataset) == 23
    assert metrics["eval/reward/num_items"] == 23 * N_SAMPLES and metrics["eval/reward/num_timeouts"] == 0
    assert [size for size, _ in model.requests] == [5, 5, 5, 5, 3]  # batches of prompts
    assert all(s is sampling for _, s in model.requests)
    assert "eval/avg@4" in format_metrics(metrics)
    assert not any("/synthetic/" in name for name in metrics)  # one data source: no per-source split


def test_per_source_metrics_when_the_set_mixes_sources(arithmetic_val, tokenizer, reward_pool):
    from dataclasses import replace

    dataset = build_prompt_dataset(arithmetic_val, tokenizer)
    mixed = [replace(e, data_source="setA" if i < 10 else "setB") for i, e in enumerate(dataset)]
    model = scripted_model(dataset, tokenizer)
    result = evaluate(model, mixed, reward_pool, SamplingConfig(n=N_SAMPLES), pass_ks=(2,))
    correct = [r.num_correct for r in result.records]
    assert result.metrics["eval/setA/avg@4"] == pytest.approx(np.mean(correct[:10]) / 4)
    assert result.metrics["eval/setB/pass@2"] == pytest.approx(
        np.mean([brute_force_pass_at_k(4, c, 2) for c in correct[10:]]))


def test_bad_requests_and_bad_generators_are_clear_errors(arithmetic_val, tokenizer, reward_pool):
    dataset = build_prompt_dataset(arithmetic_val, tokenizer)
    model = scripted_model(dataset, tokenizer)
    with pytest.raises(ValueError, match=r"1 <= k <= sampling.n=2; got k=\[4\]"):
        evaluate(model, dataset, reward_pool, SamplingConfig(n=2), pass_ks=(1, 4))

    def drops_a_sample(prompts, sampling):
        return [completions[:-1] for completions in model(prompts, sampling)]

    with pytest.raises(RuntimeError, match="returned 3 completions for prompt 0, expected sampling.n=4"):
        evaluate(drops_a_sample, dataset, reward_pool, SamplingConfig(n=4))

    def reversed_order(prompts, sampling):
        return model(prompts, sampling)[::-1]

    with pytest.raises(RuntimeError, match="must be in request order"):
        evaluate(reversed_order, dataset, reward_pool, SamplingConfig(n=1))


def test_run_evaluation_writes_metrics_and_samples(arithmetic_val, tokenizer, tmp_path):
    dataset = build_prompt_dataset(arithmetic_val, tokenizer)
    model = scripted_model(dataset, tokenizer)
    result = run_evaluation(arithmetic_val, tokenizer, model, SamplingConfig(n=2), reward_workers=1,
                            pass_ks=(1, 2), output_dir=tmp_path / "out")
    written = json.loads((tmp_path / "out" / "eval_metrics.json").read_text())
    assert written == pytest.approx(result.metrics)
    samples = [json.loads(line) for line in (tmp_path / "out" / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 23 and len(samples[0]["responses"]) == 2 and len(samples[0]["scores"]) == 2
    assert samples[4]["num_correct"] == min(4 % 5, 2)
    # a dataset built beforehand (what `megatron-rl eval` does before it starts the engines) gives the same result
    again = run_evaluation(dataset, tokenizer, model, SamplingConfig(n=2), reward_workers=1, pass_ks=(1, 2))
    timings = ("wall_s", "max_call_s")
    assert {k: v for k, v in again.metrics.items() if not k.endswith(timings)} == pytest.approx(
        {k: v for k, v in result.metrics.items() if not k.endswith(timings)})
