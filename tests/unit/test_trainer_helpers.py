"""The trainer's pure helpers: mini-batch split and the combination of their metrics."""
import pytest
import torch

from megatron_rl.actor.batch import ActorBatch
from megatron_rl.trainer import _combine_mini_batches, _split


def _batch(n=7):
    return ActorBatch(
        prompt_ids=[[1, i + 2] for i in range(n)], response_ids=[[3] * (i + 1) for i in range(n)],
        advantages=torch.arange(n, dtype=torch.float32), old_log_probs=[[-0.1 * i] * (i + 1) for i in range(n)],
        loss_mask=[[True] * (i + 1) for i in range(n)],
    )


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_split_keeps_every_sequence_once_in_order_with_its_fields(parts):
    batch = _batch()
    minis = list(_split(batch, parts))
    assert len(minis) == parts
    assert [p.tolist() for m in minis for p in m.prompt_ids] == [p.tolist() for p in batch.prompt_ids]
    assert torch.equal(torch.cat([m.advantages for m in minis]), batch.advantages)
    for m in minis:  # per-token fields travel with their sequence
        assert all(lp.numel() == r.numel() for lp, r in zip(m.old_log_probs, m.response_ids))
        assert all(lm.numel() == r.numel() for lm, r in zip(m.loss_mask, m.response_ids))


def test_combined_metrics_sum_counts_and_average_the_rest():
    steps = [{"loss": 1.0, "grad_norm": 2.0, "seq_clip_frac_low": 0.0, "model_tokens": 10.0, "step_seconds": 1.0,
              "num_sequences": 4.0, "tokens_per_second": 10.0},
             {"loss": 3.0, "grad_norm": 4.0, "seq_clip_frac_low": 0.5, "model_tokens": 30.0, "step_seconds": 3.0,
              "num_sequences": 4.0, "tokens_per_second": 10.0}]
    combined = _combine_mini_batches(steps)
    assert combined["loss"] == 2.0 and combined["grad_norm"] == 3.0 and combined["seq_clip_frac_low"] == 0.25
    assert combined["model_tokens"] == 40.0 and combined["num_sequences"] == 8.0 and combined["step_seconds"] == 4.0
    assert combined["tokens_per_second"] == 10.0 and combined["optimizer_steps"] == 2.0
