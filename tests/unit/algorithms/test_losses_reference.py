"""Each registered policy loss equals a straightforward float64 implementation of its paper's formula, written
here with explicit loops over sequences and tokens (values AND gradients w.r.t. the per-token log-probs).

Each batch (loss_batches.make_batch, seeds 1 and 6) has an empty response, length-1 and length-2 responses, a full-width one,
a group with all-equal rewards, and both clipped and unclipped tokens/sequences for every loss.
Tolerance: both sides are float64 and differ only in summation order, so rounding is ~1e-16 relative; we
assert 1e-12 relative (a normalisation or clipping mistake is off by O(1)).
"""
import math

import pytest
import torch

from megatron_rl.algorithms import LOSS_REGISTRY, kl_estimate, policy_loss
from tests.unit.algorithms.loss_batches import FULLY_MASKED_ROWS, make_batch, with_fully_masked_rows

TOL = dict(rtol=1e-12, atol=1e-15)


def clip_surrogate(ratio, adv, eps_low, eps_high):
    """PPO's clipped surrogate, as a loss: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)."""
    return -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)


def valid_tokens(mask, i):
    return [t for t in range(mask.shape[1]) if mask[i, t]]


def token_terms(lp, old, adv, mask, eps_low, eps_high, extra=None):
    """terms[i] = per-token losses of sequence i (token ratio exp(lp - old)), plus extra(i, t) if given."""
    terms = []
    for i in range(lp.shape[0]):
        row = []
        for t in valid_tokens(mask, i):
            a = adv[i] if adv.dim() == 1 else adv[i, t]
            term = clip_surrogate(torch.exp(lp[i, t] - old[i, t]), a, eps_low, eps_high)
            row.append(term + (extra(i, t) if extra else 0.0))
        terms.append(row)
    return terms


def grpo_reference(terms, n_seq, **_):
    """DeepSeekMath eq. 3: (1/G) sum_i (1/|o_i|) sum_t l_it (an empty response contributes nothing)."""
    return sum(sum(row) / len(row) for row in terms if row) / n_seq


def token_mean_reference(terms, **_):
    """DAPO eq. 8 (and PPO's token mean): sum_i sum_t l_it / sum_i |o_i|."""
    return sum(sum(row) for row in terms if row) / sum(len(row) for row in terms)


def dr_grpo_reference(terms, n_seq, max_len, **_):
    """Dr.GRPO eq. 3 (as in its code, `masked_mean(..., constant=MAX_TOKENS)`): (1/G) sum_i sum_t l_it / L_max."""
    return sum(sum(row) for row in terms if row) / (n_seq * max_len)


def gspo_reference(lp, old, adv, mask, eps_low, eps_high, length_weighted=False, n_seq=None):
    """GSPO eq. 5/7: s_i = exp(mean_t (lp - old)), J = (1/G) sum_i -min(s_i A_i, clip(s_i) A_i), gradients
    through s_i itself (the literal sequence form). LUSPO: each sequence's term multiplied by |y_i|.
    n_seq: G, default every row."""
    total = 0.0
    for i in range(lp.shape[0]):
        toks = valid_tokens(mask, i)
        if not toks:
            continue
        s = torch.exp(sum(lp[i, t] - old[i, t] for t in toks) / len(toks))
        term = clip_surrogate(s, adv[i], eps_low, eps_high)
        total = total + (len(toks) * term if length_weighted else term)
    return total / (lp.shape[0] if n_seq is None else n_seq)


def gspo_token_reference(lp, old, adv, mask, eps_low, eps_high, n_seq=None):
    """GSPO-token eq. 13: s_it = sg(s_i) * pi(y_it) / sg(pi(y_it)); (1/G) sum_i (1/|y_i|) sum_t -min(s_it A_it, ...)."""
    total = 0.0
    for i in range(lp.shape[0]):
        toks = valid_tokens(mask, i)
        if not toks:
            continue
        s = math.exp(sum(float(lp[i, t].detach() - old[i, t]) for t in toks) / len(toks))
        row = [clip_surrogate(s * torch.exp(lp[i, t] - lp[i, t].detach()), adv[i, t], eps_low, eps_high) for t in toks]
        total = total + sum(row) / len(toks)
    return total / (lp.shape[0] if n_seq is None else n_seq)


TOKEN_REFERENCES = {"ppo": token_mean_reference, "grpo": grpo_reference, "dapo": token_mean_reference,
                    "dr_grpo": dr_grpo_reference}
PAPER_CLIPS = {"ppo": (0.2, 0.2), "grpo": (0.2, 0.2), "dapo": (0.2, 0.28), "dr_grpo": (0.2, 0.2),
               "gspo": (3e-4, 4e-4), "gspo_token": (3e-4, 4e-4), "luspo": (2e-3, 2.5e-3)}


def reference(name, b, lp, eps_low, eps_high, adv=None, extra=None, n_seq=None):
    """The paper formula of loss `name`; n_seq: the number of sequences G it averages over (default every row)."""
    old, mask = b["old_log_probs"], b["response_mask"]
    adv = b["advantages"] if adv is None else adv
    n_seq = lp.shape[0] if n_seq is None else n_seq
    if name in TOKEN_REFERENCES:
        terms = token_terms(lp, old, adv, mask, eps_low, eps_high, extra)
        return TOKEN_REFERENCES[name](terms, n_seq=n_seq, max_len=lp.shape[1])
    assert extra is None
    if name == "gspo_token":
        return gspo_token_reference(lp, old, adv, mask, eps_low, eps_high, n_seq=n_seq)
    return gspo_reference(lp, old, adv, mask, eps_low, eps_high, length_weighted=(name == "luspo"), n_seq=n_seq)


def value_and_grad(fn, log_probs):
    lp = log_probs.clone().requires_grad_()
    value = fn(lp)
    (grad,) = torch.autograd.grad(value, lp)
    return value.detach(), grad


def test_registry_holds_the_documented_losses():
    assert set(LOSS_REGISTRY) == set(PAPER_CLIPS)
    for name, (lo, hi) in PAPER_CLIPS.items():
        assert (LOSS_REGISTRY[name].clip_low, LOSS_REGISTRY[name].clip_high) == (lo, hi), name


# Two random batches; both give every loss clipped-low, clipped-high and unclipped tokens (checked below).
SEEDS = (1, 6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(PAPER_CLIPS))
def test_loss_matches_paper_formula(name, seed):
    b = make_batch(seed)
    adv = b["token_advantages"] if name == "gspo_token" else b["advantages"]
    eps_low, eps_high = PAPER_CLIPS[name]
    got, got_grad = value_and_grad(
        lambda lp: policy_loss(name, lp, b["old_log_probs"], adv, b["response_mask"])[0], b["log_probs"])
    want, want_grad = value_and_grad(lambda lp: reference(name, b, lp, eps_low, eps_high, adv), b["log_probs"])
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_grad, want_grad, **TOL)
    # Not vacuous: some tokens are clipped (zero gradient) and some are not, and padding gets no gradient.
    mask = b["response_mask"]
    assert (got_grad[mask] == 0).any() and (got_grad[mask] != 0).any()
    assert (got_grad[~mask] == 0).all()


SEQ_MEAN_LOSSES = sorted(n for n, spec in LOSS_REGISTRY.items() if spec.aggregation != "token-mean")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(PAPER_CLIPS))
def test_exclude_fully_masked_matches_paper_formula_over_nonempty_rows(name, seed):
    """exclude_fully_masked=True: G in each paper formula is the number of rows with at least one unmasked token
    (verl's seq-mean convention). The batch has four fully masked rows (the empty response plus FULLY_MASKED_ROWS,
    as mask_truncated leaves truncated responses) out of 16; token-mean losses (ppo, dapo) are unchanged."""
    b = with_fully_masked_rows(make_batch(seed))
    mask = b["response_mask"]
    nonempty = int(mask.any(-1).sum())
    assert nonempty == mask.shape[0] - 1 - len(FULLY_MASKED_ROWS) == 12
    adv = b["token_advantages"] if name == "gspo_token" else b["advantages"]
    eps_low, eps_high = PAPER_CLIPS[name]

    def ours(exclude):
        return lambda lp: policy_loss(name, lp, b["old_log_probs"], adv, mask, exclude_fully_masked=exclude)[0]

    got, got_grad = value_and_grad(ours(True), b["log_probs"])
    want, want_grad = value_and_grad(
        lambda lp: reference(name, b, lp, eps_low, eps_high, adv, n_seq=nonempty), b["log_probs"])
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_grad, want_grad, **TOL)
    assert (got_grad[mask] != 0).any() and (got_grad[~mask] == 0).all()
    # Against the default (N = all 16 rows): seq-mean losses scale by 16/12 exactly, token-mean ones not at all.
    default, default_grad = value_and_grad(ours(False), b["log_probs"])
    scale = mask.shape[0] / nonempty if name in SEQ_MEAN_LOSSES else 1.0
    assert default != 0
    torch.testing.assert_close(got, default * scale, **TOL)
    torch.testing.assert_close(got_grad, default_grad * scale, **TOL)


def test_exclude_fully_masked_on_an_all_masked_batch_gives_zero_not_nan():
    """Every row fully masked: N = 0 non-empty rows, the loss is the empty sum 0 (never 0/0) with zero gradient."""
    b = make_batch()
    empty = torch.zeros_like(b["response_mask"])
    for name in PAPER_CLIPS:
        adv = b["token_advantages"] if name == "gspo_token" else b["advantages"]
        lp = b["log_probs"].clone().requires_grad_()
        loss, _ = policy_loss(name, lp, b["old_log_probs"], adv, empty, exclude_fully_masked=True)
        loss.backward()
        assert loss.item() == 0.0 and not lp.grad.any(), name


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_exercises_both_clip_sides_for_every_loss(seed):
    b = make_batch(seed)
    for name in PAPER_CLIPS:
        adv = b["token_advantages"] if name == "gspo_token" else b["advantages"]
        means = policy_loss(name, b["log_probs"], b["old_log_probs"], adv, b["response_mask"])[1].means()
        assert means["clip_frac_low"] > 0 and means["clip_frac_high"] > 0, (name, means)


def test_gspo_token_with_sequence_advantages_equals_gspo():
    b = make_batch()
    per_token = b["advantages"][:, None].expand_as(b["log_probs"])
    args = (b["old_log_probs"],)
    g_val, g_grad = value_and_grad(
        lambda lp: policy_loss("gspo", lp, *args, b["advantages"], b["response_mask"])[0], b["log_probs"])
    t_val, t_grad = value_and_grad(
        lambda lp: policy_loss("gspo_token", lp, *args, per_token, b["response_mask"])[0], b["log_probs"])
    torch.testing.assert_close(g_val, t_val, **TOL)
    torch.testing.assert_close(g_grad, t_grad, **TOL)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "low_var_kl"])
@pytest.mark.parametrize("name", ["grpo", "dapo", "dr_grpo"])
def test_kl_entropy_and_tis_terms(name, estimator):
    """l_it = min(exp(old - rollout), C) * pg_it + beta * KL_it - c_H * H_it, aggregated like the loss."""
    b = make_batch()
    beta, c_h, cap = 0.05, 0.01, 1.5
    ref, ent, rollout, old = b["ref_log_probs"], b["entropy"], b["rollout_log_probs"], b["old_log_probs"]

    def kl(lp, i, t):  # Schulman's estimators of KL(pi_theta || pi_ref), log r = ref - lp
        log_r = ref[i, t] - lp[i, t]
        return {"k1": -log_r, "k2": 0.5 * log_r**2}.get(estimator, torch.exp(log_r) - 1 - log_r)

    def ours(lp, entropy):
        return policy_loss(name, lp, old, b["advantages"], b["response_mask"], kl_coef=beta, kl_estimator=estimator,
                           ref_log_probs=ref, entropy_coef=c_h, entropy=entropy, tis_cap=cap,
                           rollout_log_probs=rollout)[0]

    def theirs(lp, entropy):
        eps_low, eps_high = PAPER_CLIPS[name]
        terms = []
        for i in range(lp.shape[0]):
            row = []
            for t in valid_tokens(b["response_mask"], i):
                w = min(math.exp(float(old[i, t] - rollout[i, t])), cap)
                pg = clip_surrogate(torch.exp(lp[i, t] - old[i, t]), b["advantages"][i], eps_low, eps_high)
                row.append(w * pg + beta * kl(lp, i, t) - c_h * entropy[i, t])
            terms.append(row)
        return TOKEN_REFERENCES[name](terms, n_seq=lp.shape[0], max_len=lp.shape[1])

    lp0, ent0 = b["log_probs"].clone().requires_grad_(), ent.clone().requires_grad_()
    lp1, ent1 = b["log_probs"].clone().requires_grad_(), ent.clone().requires_grad_()
    got, want = ours(lp0, ent0), theirs(lp1, ent1)
    torch.testing.assert_close(got, want, **TOL)
    got_grads = torch.autograd.grad(got, (lp0, ent0))
    want_grads = torch.autograd.grad(want, (lp1, ent1))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **TOL)


def test_k3_kl_is_clamped_to_ten_nats_per_token():
    """k3 = (r - 1) - log r is clamped to [0, 10] (kl.py, as verl's low_var_kl): a token whose reference
    log-prob is 30 nats below the policy's contributes 10, not ~29, and no gradient."""
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-31.0, -2.5]], dtype=torch.float64)
    for name in ("k3", "low_var_kl"):
        kl = kl_estimate(lp, ref, name)
        small = math.expm1(-0.5) + 0.5  # log r = -0.5: well inside the clamp
        assert kl.tolist() == [[10.0, pytest.approx(small, rel=1e-12)]]
        (grad,) = torch.autograd.grad(kl.sum(), lp)
        assert grad[0, 0] == 0 and grad[0, 1] != 0
    assert kl_estimate(lp, ref, "k1")[0, 0].item() == 30.0  # k1 and k2 are not clamped
    assert kl_estimate(lp, ref, "k2")[0, 0].item() == 450.0


def test_luspo_with_kl_matches_length_weighted_reference():
    """Options compose with sequence ratios too: LUSPO + k3 KL = (1/N) sum_i sum_t (pg_it + beta k3_it)."""
    b = make_batch()
    beta = 0.1
    ref = b["ref_log_probs"]
    eps_low, eps_high = PAPER_CLIPS["luspo"]

    def theirs(lp):
        kl = sum(torch.exp(ref[i, t] - lp[i, t]) - 1 - (ref[i, t] - lp[i, t])
                 for i in range(lp.shape[0]) for t in valid_tokens(b["response_mask"], i))
        return reference("luspo", b, lp, eps_low, eps_high) + beta * kl / lp.shape[0]

    got, got_grad = value_and_grad(lambda lp: policy_loss(
        "luspo", lp, b["old_log_probs"], b["advantages"], b["response_mask"], kl_coef=beta, ref_log_probs=ref)[0],
        b["log_probs"])
    want, want_grad = value_and_grad(theirs, b["log_probs"])
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_grad, want_grad, **TOL)


def test_metrics_match_explicit_counts():
    b = make_batch()
    lp, old, adv, mask = b["log_probs"], b["old_log_probs"], b["advantages"], b["response_mask"]
    _, metrics = policy_loss("dapo", lp, old, adv, mask, entropy=b["entropy"], ref_log_probs=b["ref_log_probs"])
    tokens = [(i, t) for i in range(lp.shape[0]) for t in valid_tokens(mask, i)]
    ratio = {(i, t): math.exp(float(lp[i, t] - old[i, t])) for i, t in tokens}
    assert metrics.pair("clip_frac_low") == (sum(ratio[k] < 0.8 and adv[k[0]] < 0 for k in tokens), len(tokens))
    assert metrics.pair("clip_frac_high") == (sum(ratio[k] > 1.28 and adv[k[0]] > 0 for k in tokens), len(tokens))
    means = metrics.means()
    assert means["ratio_mean"] == pytest.approx(sum(ratio.values()) / len(tokens), rel=1e-12)
    assert means["approx_kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in ratio.values()) / len(tokens),
                                               rel=1e-9)
    assert means["entropy"] == pytest.approx(float(b["entropy"][mask].mean()), rel=1e-12)
    assert "kl" in means and "tis_weight_mean" not in means  # ref given without kl_coef: metric only

    _, metrics = policy_loss("gspo", lp, old, adv, mask)
    seqs = [i for i in range(lp.shape[0]) if mask[i].any()]
    s = {i: math.exp(sum(float(lp[i, t] - old[i, t]) for t in valid_tokens(mask, i)) / mask[i].sum().item())
         for i in seqs}
    assert metrics.pair("seq_clip_frac_low") == (sum(s[i] < 1 - 3e-4 for i in seqs), len(seqs))
    assert metrics.pair("seq_clip_frac_high") == (sum(s[i] > 1 + 4e-4 for i in seqs), len(seqs))
    assert metrics.means()["seq_ratio_mean"] == pytest.approx(sum(s.values()) / len(seqs), rel=1e-12)


def test_metric_only_inputs_do_not_change_the_loss():
    b = make_batch()
    args = ("grpo", b["log_probs"], b["old_log_probs"], b["advantages"], b["response_mask"])
    plain, _ = policy_loss(*args)
    with_inputs, metrics = policy_loss(*args, ref_log_probs=b["ref_log_probs"], entropy=b["entropy"],
                                       rollout_log_probs=b["rollout_log_probs"])
    assert torch.equal(plain, with_inputs)
    assert {"kl", "entropy", "rollout_kl"} <= set(metrics.names())


def test_garbage_in_padding_reaches_neither_value_nor_gradient():
    b = make_batch()
    mask = b["response_mask"]
    dirty_lp = b["log_probs"].masked_fill(~mask, float("nan"))
    dirty_old = b["old_log_probs"].masked_fill(~mask, float("-inf"))
    for name in ("dapo", "luspo"):
        clean, clean_grad = value_and_grad(
            lambda lp: policy_loss(name, lp, b["old_log_probs"], b["advantages"], mask)[0], b["log_probs"])
        dirty, dirty_grad = value_and_grad(lambda lp: policy_loss(name, lp, dirty_old, b["advantages"], mask)[0],
                                           dirty_lp)
        assert torch.equal(clean, dirty)
        assert torch.equal(clean_grad, dirty_grad)


def test_all_empty_batch_gives_zero_loss_not_nan():
    b = make_batch()
    empty = torch.zeros_like(b["response_mask"])
    for name in PAPER_CLIPS:
        adv = b["token_advantages"] if name == "gspo_token" else b["advantages"]
        loss, metrics = policy_loss(name, b["log_probs"].clone().requires_grad_(), b["old_log_probs"], adv, empty)
        assert loss.item() == 0.0, name
        assert math.isnan(metrics.means()["ratio_mean"])  # nothing counted: reported as NaN, not 0


def test_float32_inputs_compute_in_float32_and_match_float64():
    b = make_batch()
    args64 = (b["log_probs"], b["old_log_probs"], b["advantages"], b["response_mask"])
    args32 = tuple(x.float() if x.is_floating_point() else x for x in args64)
    for name in ("dapo", "luspo"):
        loss32, _ = policy_loss(name, *args32)
        loss64, _ = policy_loss(name, *args64)
        assert loss32.dtype == torch.float32
        # float32 rounding of the inputs and the sums (~1e-7 relative per term over ~100 terms)
        torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=1e-6)


def test_gradient_flows_only_into_log_probs_and_entropy():
    b = make_batch()
    leaves = {k: b[k].clone().requires_grad_() for k in ("log_probs", "old_log_probs", "advantages",
                                                          "ref_log_probs", "rollout_log_probs", "entropy")}
    loss, _ = policy_loss("dapo", leaves["log_probs"], leaves["old_log_probs"], leaves["advantages"],
                          b["response_mask"], kl_coef=0.1, ref_log_probs=leaves["ref_log_probs"], tis_cap=2.0,
                          rollout_log_probs=leaves["rollout_log_probs"], entropy_coef=0.01,
                          entropy=leaves["entropy"])
    loss.backward()
    assert leaves["log_probs"].grad is not None and leaves["entropy"].grad is not None
    for data in ("old_log_probs", "advantages", "ref_log_probs", "rollout_log_probs"):
        assert leaves[data].grad is None, data
