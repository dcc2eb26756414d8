"""rollout_mismatch against hand-computed values, and its input checks."""
import math

import pytest
import torch

from megatron_rl.rollout.mismatch import rollout_mismatch, pad_logprobs


def test_hand_computed_values():
    actor = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0]])
    rollout = torch.tensor([[-1.5, -2.0, -2.0], [-0.25, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the 9 vs -9 is padding and must not count
    m = rollout_mismatch(actor, rollout, mask)
    # diffs: row0 = [0.5, 0, -1], row1 = [-0.25, 0.5]
    assert m.num_tokens == 5 and m.num_sequences == 2
    assert m.mean_abs_diff == pytest.approx((0.5 + 0 + 1 + 0.25 + 0.5) / 5)
    assert m.max_abs_diff == pytest.approx(1.0)
    assert m.seq_log_ratio_max_abs == pytest.approx(0.5)  # row sums -0.5 and 0.25
    assert m.seq_mean_log_ratio_max_abs == pytest.approx(0.5 / 3)  # -0.5/3 vs 0.25/2 = 0.125
    assert m.seq_log_ratio_mean == pytest.approx((-0.5 + 0.25) / 2)


def test_identical_inputs_give_zero_and_padding_may_hold_nan():
    logp = torch.tensor([[-1.0, -2.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    m = rollout_mismatch(logp, logp.clone(), mask)
    assert m.mean_abs_diff == m.max_abs_diff == m.seq_log_ratio_max_abs == 0.0


def test_sequences_without_tokens_are_left_out_of_sequence_metrics():
    actor = torch.tensor([[-1.0, -1.0], [-5.0, -5.0]])
    rollout = torch.tensor([[-1.0, -2.0], [0.0, 0.0]])
    m = rollout_mismatch(actor, rollout, torch.tensor([[1, 1], [0, 0]]))
    assert m.num_sequences == 1 and m.seq_log_ratio_mean == pytest.approx(1.0)


def test_no_valid_token_gives_nan_not_an_error():
    m = rollout_mismatch(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    assert m.num_tokens == 0 and math.isnan(m.mean_abs_diff) and math.isnan(m.seq_log_ratio_max_abs)


def test_as_dict_prefixes_every_field():
    d = rollout_mismatch(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1)).as_dict()
    assert set(d) == {
        "rollout/mismatch_" + k
        for k in ("mean_abs_diff", "max_abs_diff", "seq_log_ratio_max_abs", "seq_mean_log_ratio_max_abs",
                  "seq_log_ratio_mean", "num_tokens", "num_sequences")
    }


@pytest.mark.parametrize(
    "actor, rollout, mask, error",
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), "rollout_logprobs has shape"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 3), "response_mask has shape"),
        (torch.zeros(6), torch.zeros(6), torch.ones(6), r"actor_logprobs must be \[batch, tokens\]"),
        (torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, 0.5]]), "only 0 and 1"),
        (torch.tensor([[0.0, float("inf")]]), torch.zeros(1, 2), torch.ones(1, 2), "actor_logprobs has NaN/inf"),
        (torch.zeros(1, 2), torch.tensor([[float("nan"), 0.0]]), torch.ones(1, 2), "rollout_logprobs has NaN/inf"),
    ],
)
def test_bad_input_names_the_field(actor, rollout, mask, error):
    with pytest.raises(ValueError, match=error):
        rollout_mismatch(actor, rollout, mask)


def test_pad_logprobs_matches_rollout_mismatch_on_ragged_input():
    values, mask = pad_logprobs([[-1.0, -2.0], [], [-0.5]])
    assert values.tolist() == [[-1.0, -2.0], [0.0, 0.0], [-0.5, 0.0]]
    assert mask.tolist() == [[1, 1], [0, 0], [1, 0]]
    other, _ = pad_logprobs([[-1.0, -1.0], [], [-0.5]])
    assert rollout_mismatch(values, other, mask).mean_abs_diff == pytest.approx(1.0 / 3)
    empty_values, empty_mask = pad_logprobs([])
    assert empty_values.shape == empty_mask.shape == (0, 0)


def test_pad_logprobs_takes_the_actors_tensors_with_the_same_values_as_lists():
    """The actor returns 1-D tensors (float32, or float64 elsewhere): padded as they are, the same values as the
    lists of their floats (float64 rounds to float32 once either way)."""
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, generator=generator, dtype=torch.float64) for n in (3, 0, 7, 1)]
    for dtype in (torch.float32, torch.float64):
        tensors = [r.to(dtype) for r in rows]
        from_tensors, mask = pad_logprobs(tensors)
        from_lists, list_mask = pad_logprobs([t.tolist() for t in tensors])
        assert from_tensors.dtype == torch.float32 and torch.equal(from_tensors, from_lists)
        assert torch.equal(mask, list_mask) and mask.sum(dim=1).tolist() == [3, 0, 7, 1]
