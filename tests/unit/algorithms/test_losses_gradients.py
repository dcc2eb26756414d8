"""LUSPO's per-token gradient does not depend on the response length; GSPO's scales as 1/|y_i|.

Two groups of sequences of lengths 1, 3, 8 and 13 with the same advantage and the same sequence ratio s_i
(every token has the same log-ratio, so s_i = exp(d) for all lengths), inside the clip range. GSPO's
gradient per token is -s A / (N |y_i|) (GSPO arXiv 2507.18071, eq. 10), LUSPO's is -s A / N.
"""
import torch

from megatron_rl.algorithms import policy_loss

LENGTHS = (1, 3, 8, 13)
WIDTH = 16


def per_token_grads(name, log_ratio=1e-4, advantage=0.7):
    rows = len(LENGTHS)
    mask = torch.arange(WIDTH)[None, :] < torch.tensor(LENGTHS)[:, None]
    lp = (-torch.rand(rows, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).requires_grad_()
    old = lp.detach() - log_ratio
    adv = torch.full((rows,), advantage, dtype=torch.float64)
    loss, _ = policy_loss(name, lp, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, lp)
    return grad, mask


def test_luspo_token_gradient_is_independent_of_length():
    grad, mask = per_token_grads("luspo")
    expected = -0.7 * torch.exp(torch.tensor(1e-4, dtype=torch.float64)) / len(LENGTHS)
    # float64, one multiplication apart: 1e-12 relative
    torch.testing.assert_close(grad[mask], expected.expand(int(mask.sum())), rtol=1e-12, atol=0)


def test_gspo_token_gradient_scales_inversely_with_length():
    grad, mask = per_token_grads("gspo")
    lengths = mask.sum(1, keepdim=True).double().expand_as(grad)
    scaled = (grad * lengths)[mask]  # |y_i| * grad_it must be the same for every token of every length
    expected = -0.7 * torch.exp(torch.tensor(1e-4, dtype=torch.float64)) / len(LENGTHS)
    torch.testing.assert_close(scaled, expected.expand(int(mask.sum())), rtol=1e-12, atol=0)
    assert abs(float(grad[0, 0] / grad[3, 0]) - 13.0) < 1e-9  # length 1 vs length 13: 13x the gradient


def test_clipped_sequences_get_no_gradient():
    # log-ratio 1e-2 puts s_i = 1.01 above both clip ranges; with A > 0 the upper clip zeroes the gradient.
    for name in ("gspo", "luspo"):
        grad, _ = per_token_grads(name, log_ratio=1e-2)
        assert torch.count_nonzero(grad) == 0, name
