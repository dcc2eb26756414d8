"""The normalisation contract in one process: micro-batch shares add up to the full-batch loss and gradient.

(The multi-rank DP / CP versions are in tests/distributed/test_loss_invariance.py.)
"""
import pytest
import torch

from megatron_rl.algorithms import LOSS_REGISTRY, GlobalBatchCounts, LossMetrics, policy_loss, policy_loss_share
from megatron_rl.algorithms.normalization import token_weights
from tests.unit.algorithms.loss_batches import make_batch, with_fully_masked_rows

# Uneven micro-batch sizes, each trimmed to its own longest response (dynamic padding), as an actor may do.
MICRO_BATCH_ROWS = [slice(0, 3), slice(3, 8), slice(8, 9), slice(9, 16)]


def test_counts_from_masks():
    b = make_batch()
    masks = [b["response_mask"][rows] for rows in MICRO_BATCH_ROWS]
    counts = GlobalBatchCounts.from_masks(masks)
    assert counts == GlobalBatchCounts(16, int(b["response_mask"].sum()), 16)
    assert GlobalBatchCounts.from_masks(masks, max_response_length=4096).max_response_length == 4096
    assert GlobalBatchCounts.from_masks([m.float() for m in masks]).num_tokens == counts.num_tokens


def test_counts_exclude_fully_masked_rows_across_micro_batches():
    b = with_fully_masked_rows(make_batch())
    masks = [b["response_mask"][rows] for rows in MICRO_BATCH_ROWS]
    default = GlobalBatchCounts.from_masks(masks)
    assert (default.sequence_count, default.num_nonempty_sequences, default.exclude_fully_masked) == (16, None, False)
    counts = GlobalBatchCounts.from_masks(masks, exclude_fully_masked=True)
    assert counts.exclude_fully_masked and counts.num_sequences == 16  # rows are still all rows
    assert counts.num_nonempty_sequences == counts.sequence_count == int(b["response_mask"].any(-1).sum()) == 12
    assert counts.num_tokens == default.num_tokens
    # The seq-mean weights use the non-empty N; token-mean's do not change.
    lengths = b["response_mask"].sum(1)
    for aggregation in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        w_on = token_weights(aggregation, b["response_mask"], lengths, counts)
        w_off = token_weights(aggregation, b["response_mask"], lengths, default)
        torch.testing.assert_close(w_on, w_off * 16 / 12, rtol=1e-15, atol=0)  # one float64 division each
    assert torch.equal(token_weights("token-mean", b["response_mask"], None, counts),
                       token_weights("token-mean", b["response_mask"], None, default))


def test_exclude_fully_masked_is_validated():
    mask = make_batch()["response_mask"]
    for bad in (1, "true", None):
        with pytest.raises(TypeError, match="exclude_fully_masked must be a bool"):
            GlobalBatchCounts.from_masks([mask], exclude_fully_masked=bad)
        with pytest.raises(TypeError, match="exclude_fully_masked must be a bool"):
            policy_loss("luspo", mask.double(), mask.double(), mask.double()[:, 0], mask, exclude_fully_masked=bad)
    with pytest.raises(ValueError, match="needs num_nonempty_sequences.*from_masks"):
        GlobalBatchCounts(16, 10, 16, exclude_fully_masked=True)
    with pytest.raises(ValueError, match=r"num_nonempty_sequences must be in \[0, num_sequences=16\]"):
        GlobalBatchCounts(16, 10, 16, num_nonempty_sequences=17, exclude_fully_masked=True)
    all_masked = GlobalBatchCounts.from_masks([torch.zeros_like(mask)], exclude_fully_masked=True)
    assert (all_masked.num_sequences, all_masked.sequence_count) == (16, 0)


def test_weights_of_each_aggregation_on_the_full_batch():
    mask = make_batch()["response_mask"]
    counts = GlobalBatchCounts.from_masks([mask])
    lengths = mask.sum(1)
    nonempty = int((lengths > 0).sum())
    # float64 sums of <= 256 weights: 1e-12
    assert token_weights("token-mean", mask, None, counts).sum().item() == pytest.approx(1.0, rel=1e-12)
    w = token_weights("seq-mean-token-mean", mask, lengths, counts)
    assert w.sum().item() == pytest.approx(nonempty / 16, rel=1e-12)  # each non-empty row weighs 1/N in total
    w = token_weights("seq-mean-token-sum", mask, None, counts)
    assert torch.equal(w.sum(1), lengths / 16.0)  # LUSPO: row weight |y_i| / N
    w = token_weights("seq-mean-token-sum-norm", mask, None, counts)
    assert w.sum().item() == pytest.approx(int(mask.sum()) / (16 * 16), rel=1e-12)


@pytest.mark.parametrize("name", sorted(LOSS_REGISTRY))
def test_micro_batch_shares_sum_to_the_full_batch(name):
    b = make_batch()
    adv_key = "token_advantages" if name == "gspo_token" else "advantages"
    options = dict(entropy=b["entropy"], ref_log_probs=b["ref_log_probs"], kl_coef=0.05,
                   rollout_log_probs=b["rollout_log_probs"], tis_cap=2.0)
    lp = b["log_probs"].clone().requires_grad_()
    full, full_metrics = policy_loss(name, lp, b["old_log_probs"], b[adv_key], b["response_mask"], **options)
    (full_grad,) = torch.autograd.grad(full, lp)

    widths = [int(b["response_mask"][rows].sum(1).max()) or 1 for rows in MICRO_BATCH_ROWS]
    trim = {rows.start: w for rows, w in zip(MICRO_BATCH_ROWS, widths)}
    counts = GlobalBatchCounts.from_masks([b["response_mask"][r, :trim[r.start]] for r in MICRO_BATCH_ROWS],
                                          max_response_length=16)
    total, grad, metrics = 0.0, torch.zeros_like(full_grad), LossMetrics()
    for rows in MICRO_BATCH_ROWS:
        width = trim[rows.start]
        part = {k: v[rows, :width] if v.dim() == 2 else v[rows] for k, v in b.items()}
        mb_lp = part["log_probs"].clone().requires_grad_()
        share, mb_metrics = policy_loss_share(
            name, mb_lp, part["old_log_probs"], part[adv_key], part["response_mask"], counts=counts,
            entropy=part["entropy"], ref_log_probs=part["ref_log_probs"], kl_coef=0.05,
            rollout_log_probs=part["rollout_log_probs"], tis_cap=2.0)
        share.backward()
        total = total + share.detach()
        grad[rows, :width] = mb_lp.grad
        metrics.merge(mb_metrics)
    # float64 and only the summation order differs: 1e-12 relative
    torch.testing.assert_close(total, full.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, full_grad, rtol=1e-12, atol=1e-15)
    assert metrics.names() == full_metrics.names()
    for metric in metrics.names():
        assert metrics.pair(metric) == pytest.approx(full_metrics.pair(metric), rel=1e-12), metric
