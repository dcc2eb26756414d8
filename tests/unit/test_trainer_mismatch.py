"""The trainer's mismatch/* metrics: MismatchMetrics under the "mismatch/" prefix, on ragged per-sequence log-probs."""
import dataclasses

import pytest
import torch

from megatron_rl.actor.batch import ActorBatch
from megatron_rl.rollout.mismatch import MismatchMetrics
from megatron_rl.training.update import mismatch_metrics


def test_mismatch_metrics_of_a_ragged_batch():
    batch = ActorBatch(prompt_ids=[[1, 2], [1]], response_ids=[[3, 4, 5], [6]])
    batch.old_log_probs = [torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-0.5])]
    batch.rollout_log_probs = [torch.tensor([-1.0, -2.5, -3.0]), torch.tensor([-0.25])]
    metrics = mismatch_metrics(batch.old_log_probs, batch.rollout_log_probs)
    assert set(metrics) == {f"mismatch/{f.name}" for f in dataclasses.fields(MismatchMetrics)}
    # token diffs 0, 0.5, 0, -0.25 over 4 tokens; sequence sums 0.5 and -0.25 (lengths 3 and 1)
    assert metrics["mismatch/mean_abs_diff"] == pytest.approx(0.75 / 4)
    assert metrics["mismatch/max_abs_diff"] == pytest.approx(0.5)
    assert metrics["mismatch/seq_log_ratio_max_abs"] == pytest.approx(0.5)
    assert metrics["mismatch/seq_mean_log_ratio_max_abs"] == pytest.approx(0.25)
    assert metrics["mismatch/seq_log_ratio_mean"] == pytest.approx(0.125)
    assert metrics["mismatch/num_tokens"] == 4 and metrics["mismatch/num_sequences"] == 2
