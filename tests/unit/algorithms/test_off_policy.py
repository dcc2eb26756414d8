"""The off-policy corrections (algorithms/off_policy.py) equal their papers' formulas, written here with explicit loops
over sequences and tokens in float64: values AND gradients of the policy loss they weight, for a token-ratio loss
(DAPO) and a sequence-ratio loss (LUSPO), plus their metrics, validation and edge cases.

rho_it = pi_old(y_t) / mu(y_t) = exp(old_log_probs - rollout_log_probs) (mu: the behaviour policy, the engine). The
policy ratio stays against pi_old; the corrections only weight each token's term. The batch (loss_batches.make_batch)
has rollout log-probs 0.3 nats (per token) away from old ones, so every band cuts some tokens and keeps others
(asserted, so the tests cannot pass vacuously). Tolerance: float64 on both sides, summation order only: 1e-12.
"""
import math

import pytest
import torch

from megatron_rl.algorithms import OffPolicyCorrection, off_policy_weights, policy_loss
from megatron_rl.errors import FieldError
from tests.unit.algorithms.loss_batches import make_batch, with_fully_masked_rows
from tests.unit.algorithms.test_losses_reference import PAPER_CLIPS, clip_surrogate, valid_tokens

TOL = dict(rtol=1e-12, atol=1e-15)

CASES = {
    "seq_tis": OffPolicyCorrection(seq_tis_cap=1.5),
    "mis_token": OffPolicyCorrection(mis="token", mis_low=0.7, mis_high=1.3),
    "mis_sequence": OffPolicyCorrection(mis="sequence", mis_low=0.5, mis_high=2.0),
    "mis_geometric": OffPolicyCorrection(mis="geometric", mis_low=0.9, mis_high=1.1),
    "icepop": OffPolicyCorrection(icepop_low=0.8, icepop_high=1.25),
    "seq_mask_kl": OffPolicyCorrection(seq_mask_kl=0.01),
    "all": OffPolicyCorrection(seq_tis_cap=1.0, mis="token", mis_low=0.4, mis_high=2.5, icepop_low=0.5,
                               icepop_high=2.0, seq_mask_kl=0.05),
}


def reference_weight(b, i, t, corr: OffPolicyCorrection, tis_cap=None) -> float:
    """w_it of the module docstring, for token t of sequence i, one term at a time."""
    old, rollout, mask = b["old_log_probs"], b["rollout_log_probs"], b["response_mask"]
    toks = valid_tokens(mask, i)

    def log_rho(u):
        return float(old[i, u] - rollout[i, u])

    seq = sum(log_rho(u) for u in toks)
    w = 1.0
    if tis_cap is not None:  # Yao et al.: min(rho_it, C)
        w *= min(math.exp(log_rho(t)), tis_cap)
    if corr.seq_tis_cap is not None:  # min(prod_t rho_it, C)
        w *= min(math.exp(seq), corr.seq_tis_cap)
    if corr.mis != "none":
        ratio = {"token": math.exp(log_rho(t)), "sequence": math.exp(seq),
                 "geometric": math.exp(seq / len(toks))}[corr.mis]
        w *= ratio if corr.mis_low <= ratio <= corr.mis_high else 0.0
    if corr.icepop:
        ratio = math.exp(log_rho(t))
        w *= 1.0 if corr.icepop_low <= ratio <= corr.icepop_high else 0.0
    if corr.seq_mask_kl is not None:  # DeepSeek-V3.2: A < 0 and mean_t log(mu / pi_old) > delta
        if float(b["advantages"][i]) < 0 and -seq / len(toks) > corr.seq_mask_kl:
            w = 0.0
    return w


def dapo_reference(b, lp, corr, tis_cap=None):
    eps_low, eps_high = PAPER_CLIPS["dapo"]
    total, count = 0.0, 0
    for i in range(lp.shape[0]):
        for t in valid_tokens(b["response_mask"], i):
            pg = clip_surrogate(torch.exp(lp[i, t] - b["old_log_probs"][i, t]), b["advantages"][i], eps_low, eps_high)
            total = total + reference_weight(b, i, t, corr, tis_cap) * pg
            count += 1
    return total / count


def luspo_reference(b, lp, corr, tis_cap=None):
    """LUSPO in its GSPO-token form: (1/N) sum_i sum_t w_it * -min(s_it A_i, clip(s_it) A_i), s_it = sg(s_i) *
    pi(y_it) / sg(pi(y_it)), s_i = exp(mean_t (lp - old)) (the ratio against pi_old, not mu)."""
    eps_low, eps_high = PAPER_CLIPS["luspo"]
    total = 0.0
    for i in range(lp.shape[0]):
        toks = valid_tokens(b["response_mask"], i)
        if not toks:
            continue
        s = math.exp(sum(float(lp[i, t].detach() - b["old_log_probs"][i, t]) for t in toks) / len(toks))
        for t in toks:
            ratio = s * torch.exp(lp[i, t] - lp[i, t].detach())
            total = total + reference_weight(b, i, t, corr, tis_cap) * clip_surrogate(ratio, b["advantages"][i],
                                                                                      eps_low, eps_high)
    return total / lp.shape[0]


REFERENCES = {"dapo": dapo_reference, "luspo": luspo_reference}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", ["dapo", "luspo"])
@pytest.mark.parametrize("seed", [1, 6])
def test_correction_matches_its_formula(name, case, seed):
    b = make_batch(seed)
    corr = CASES[case]
    lp0, lp1 = b["log_probs"].clone().requires_grad_(), b["log_probs"].clone().requires_grad_()
    got, metrics = policy_loss(name, lp0, b["old_log_probs"], b["advantages"], b["response_mask"],
                               rollout_log_probs=b["rollout_log_probs"], correction=corr)
    want = REFERENCES[name](b, lp1, corr)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(torch.autograd.grad(got, lp0)[0], torch.autograd.grad(want, lp1)[0], **TOL)
    weights = [reference_weight(b, i, t, corr) for i in range(16) for t in valid_tokens(b["response_mask"], i)]
    assert any(w == 0 for w in weights) or case == "seq_tis", "the band must cut some tokens (not vacuous)"
    assert any(w > 0 for w in weights)
    assert metrics.means()["offpolicy/weight_mean"] == pytest.approx(sum(weights) / len(weights), rel=1e-12)


def test_token_tis_with_a_correction_matches_the_product_of_both():
    b = make_batch()
    corr = CASES["icepop"]
    lp0, lp1 = b["log_probs"].clone().requires_grad_(), b["log_probs"].clone().requires_grad_()
    got, metrics = policy_loss("dapo", lp0, b["old_log_probs"], b["advantages"], b["response_mask"],
                               rollout_log_probs=b["rollout_log_probs"], correction=corr, tis_cap=1.2)
    want = dapo_reference(b, lp1, corr, tis_cap=1.2)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(torch.autograd.grad(got, lp0)[0], torch.autograd.grad(want, lp1)[0], **TOL)
    means = metrics.means()
    assert 0 < means["offpolicy/token_tis_clip_frac"] < 1 and "tis_weight_mean" in means


def test_metrics_count_what_was_masked_and_clipped():
    b = make_batch()
    mask = b["response_mask"]
    rho = torch.exp(b["old_log_probs"] - b["rollout_log_probs"])
    valid = rho[mask]
    _, m = policy_loss("dapo", b["log_probs"], b["old_log_probs"], b["advantages"], mask,
                       rollout_log_probs=b["rollout_log_probs"], correction=CASES["all"])
    means = m.means()
    assert means["offpolicy/icepop_masked_frac"] == pytest.approx(float(((valid < 0.5) | (valid > 2.0)).double().mean()))
    assert means["offpolicy/mis_masked_frac"] == pytest.approx(float(((valid < 0.4) | (valid > 2.5)).double().mean()))
    seq = [(i, valid_tokens(mask, i)) for i in range(16)]
    seq = [(i, toks) for i, toks in seq if toks]
    sums = {i: sum(float(b["old_log_probs"][i, t] - b["rollout_log_probs"][i, t]) for t in toks) for i, toks in seq}
    clipped = sum(math.exp(sums[i]) > 1.0 for i, _ in seq)
    masked = sum(float(b["advantages"][i]) < 0 and -sums[i] / len(toks) > 0.05 for i, toks in seq)
    assert means["offpolicy/seq_tis_clip_frac"] == pytest.approx(clipped / len(seq))
    assert means["offpolicy/seq_masked_frac"] == pytest.approx(masked / len(seq))
    assert means["offpolicy/seq_log_rho_mean"] == pytest.approx(sum(sums.values()) / len(seq))
    assert 0 < masked < len(seq) and 0 < clipped < len(seq)


def test_off_policy_sequence_masking_spares_positive_advantages():
    """DeepSeek-V3.2 masks only negative-advantage sequences: a sequence far off-policy with A > 0 keeps its
    gradient (it is the one the model learns from), the same sequence with A < 0 is dropped."""
    mask = torch.ones(2, 3, dtype=torch.bool)
    old = torch.zeros(2, 3, dtype=torch.float64)
    rollout = torch.full((2, 3), 0.5, dtype=torch.float64)  # mean log(mu / pi_old) = 0.5 > delta for both
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3], dtype=torch.float64)
    w, _ = off_policy_weights(old, rollout, mask, adv, OffPolicyCorrection(seq_mask_kl=0.1))
    assert torch.equal(w, torch.tensor([[1.0] * 3, [0.0] * 3], dtype=torch.float64))


def test_weights_carry_no_gradient_and_ignore_padding():
    b = with_fully_masked_rows(make_batch())
    old = b["old_log_probs"].clone().requires_grad_()
    rollout = b["rollout_log_probs"].clone()
    rollout[~b["response_mask"]] = float("nan")  # garbage in padding
    clean = torch.where(b["response_mask"], rollout, torch.zeros((), dtype=torch.float64))
    adv = b["advantages"][:, None].expand_as(old)
    w, _ = off_policy_weights(torch.where(b["response_mask"], old, 0.0), clean, b["response_mask"], adv, CASES["all"],
                              token_tis_cap=2.0)
    assert not w.requires_grad and torch.isfinite(w).all()
    assert torch.all(w[~b["response_mask"]] == 0)


def test_corrections_need_rollout_log_probs_and_a_config_object():
    b = make_batch()
    args = (b["log_probs"], b["old_log_probs"], b["advantages"], b["response_mask"])
    with pytest.raises(ValueError, match="off-policy correction is on but rollout_log_probs is missing"):
        policy_loss("dapo", *args, correction=CASES["icepop"])
    with pytest.raises(TypeError, match="correction must be an OffPolicyCorrection"):
        policy_loss("dapo", *args, rollout_log_probs=b["rollout_log_probs"], correction={"mis": "token"})
    # an all-off correction changes nothing
    plain = policy_loss("dapo", *args)[0]
    off = policy_loss("dapo", *args, rollout_log_probs=b["rollout_log_probs"], correction=OffPolicyCorrection())[0]
    assert torch.equal(plain, off)


@pytest.mark.parametrize("kwargs, field", [
    (dict(seq_tis_cap=0), "off_policy.seq_tis_cap"),
    (dict(seq_tis_cap=float("nan")), "off_policy.seq_tis_cap"),
    (dict(mis="tokens"), "off_policy.mis"),
    (dict(mis="token", mis_low=1.2, mis_high=2.0), "off_policy.mis_low"),
    (dict(mis_low=None), "off_policy.mis_low"),
    (dict(icepop_low=0.5), "off_policy.icepop_high"),
    (dict(icepop_low=0.5, icepop_high=0.9), "off_policy.icepop_low"),
    (dict(seq_mask_kl=-1.0), "off_policy.seq_mask_kl"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(FieldError, match=f"^{field}:"):
        OffPolicyCorrection(**kwargs)
