"""Bad input to the losses gives a clear error naming the field (and the fix), before any computation."""
import pytest

from megatron_rl.algorithms import GlobalBatchCounts, policy_loss, policy_loss_share
from tests.unit.algorithms.loss_batches import make_batch


@pytest.fixture
def b():
    return make_batch()


def call(b, name="dapo", **override):
    args = {k: b[k] for k in ("log_probs", "old_log_probs", "advantages", "response_mask")}
    args.update({k: override.pop(k) for k in list(override) if k in args})
    return policy_loss(name, args["log_probs"], args["old_log_probs"], args["advantages"], args["response_mask"],
                       **override)


def test_unknown_loss_name_lists_the_registered_ones(b):
    with pytest.raises(ValueError, match=r"unknown policy loss 'gspoo'.*'dapo'.*'luspo'"):
        call(b, "gspoo")


def test_unknown_option_is_a_type_error(b):
    with pytest.raises(TypeError, match="clip_hihg"):
        call(b, clip_hihg=0.3)


@pytest.mark.parametrize("field", ["log_probs", "old_log_probs"])
def test_shape_mismatch_names_the_field(b, field):
    with pytest.raises(ValueError, match=rf"{field} must have shape \(16, 16\).*got \(16, 15\)"):
        call(b, **{field: b[field][:, :15]})


def test_mask_shape_mismatch(b):
    with pytest.raises(ValueError, match=r"log_probs must have shape \(16, 12\)"):
        call(b, response_mask=b["response_mask"][:, :12])


def test_mask_with_values_other_than_0_and_1(b):
    with pytest.raises(ValueError, match="response_mask must hold only 0 and 1"):
        call(b, response_mask=b["response_mask"].float() * 2)


def test_one_dimensional_mask(b):
    with pytest.raises(ValueError, match=r"response_mask must be 2-D"):
        call(b, response_mask=b["response_mask"][0])


def test_advantages_of_wrong_length(b):
    with pytest.raises(ValueError, match=r"advantages must have shape \(16,\)"):
        call(b, advantages=b["advantages"][:15])


def test_per_token_advantages_rejected_by_sequence_losses(b):
    for name in ("gspo", "luspo"):
        with pytest.raises(ValueError, match=r"one advantage per sequence.*gspo_token"):
            call(b, name, advantages=b["token_advantages"])


@pytest.mark.parametrize("field, bad", [("log_probs", float("nan")), ("old_log_probs", float("inf")),
                                        ("log_probs", float("-inf"))])
def test_non_finite_log_probs_at_valid_tokens(b, field, bad):
    x = b[field].clone()
    x[3, 5] = bad  # row 3 is full length: a valid token
    with pytest.raises(ValueError, match=rf"{field} holds 1 non-finite value.*\(3, 5\)"):
        call(b, **{field: x})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_advantages(b, bad):
    adv = b["advantages"].clone()
    adv[0] = bad  # even an empty response's advantage must be finite: it is a bug upstream
    with pytest.raises(ValueError, match=r"advantages holds 1 non-finite value"):
        call(b, advantages=adv)


def test_non_finite_optional_inputs(b):
    ent = b["entropy"].clone()
    ent[3, 0] = float("nan")
    with pytest.raises(ValueError, match="entropy holds 1 non-finite"):
        call(b, entropy=ent)


def test_coefficients_without_their_inputs(b):
    with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_log_probs"):
        call(b, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy_coef=0.01 needs entropy"):
        call(b, entropy_coef=0.01)
    with pytest.raises(ValueError, match="tis_cap is set but rollout_log_probs is missing"):
        call(b, tis_cap=2.0)


def test_bad_option_values(b):
    with pytest.raises(ValueError, match=r"clip_low \(eps_low\) must be in \[0, 1\)"):
        call(b, clip_low=1.0)
    with pytest.raises(ValueError, match="clip_high"):
        call(b, clip_high=-0.1)
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        call(b, aggregation="mean")
    with pytest.raises(ValueError, match="unknown kl_estimator 'k4'"):
        call(b, kl_coef=0.1, ref_log_probs=b["ref_log_probs"], kl_estimator="k4")
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
        call(b, kl_coef=-1.0, ref_log_probs=b["ref_log_probs"])
    with pytest.raises(ValueError, match="tis_cap must be > 0"):
        call(b, tis_cap=0.0, rollout_log_probs=b["rollout_log_probs"])


@pytest.mark.parametrize("field", ["kl_coef", "entropy_coef"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.1"])
def test_non_finite_coefficients_are_rejected_not_ignored(b, field, bad):
    # NaN compares False with 0: unchecked, kl_coef=nan silently dropped the KL term and entropy_coef=nan made the
    # loss NaN.
    with pytest.raises(ValueError, match=rf"{field} must be a finite number"):
        call(b, **{field: bad}, ref_log_probs=b["ref_log_probs"], entropy=b["entropy"])


def test_empty_batch_names_the_mask_and_the_fix(b):
    empty = {k: b[k][:0] for k in ("log_probs", "old_log_probs", "advantages", "response_mask")}
    with pytest.raises(ValueError, match=r"response_mask has no sequences \(batch dimension 0\).*skip"):
        call(b, **empty)
    counts = GlobalBatchCounts(num_sequences=4, num_tokens=10, max_response_length=16)
    with pytest.raises(ValueError, match=r"response_mask has no sequences"):
        policy_loss_share("dapo", *empty.values(), counts=counts)


def test_integer_log_probs_rejected(b):
    with pytest.raises(TypeError, match="log_probs must be a floating-point tensor"):
        call(b, log_probs=b["log_probs"].long())


def test_single_process_api_refuses_distributed_arguments(b):
    with pytest.raises(TypeError, match="policy_loss_share"):
        call(b, cp_group=None)


def test_counts_smaller_than_the_micro_batch(b):
    counts = GlobalBatchCounts(num_sequences=4, num_tokens=10, max_response_length=16)
    with pytest.raises(ValueError, match="counts.num_sequences=4.*every micro-batch"):
        policy_loss_share("dapo", b["log_probs"], b["old_log_probs"], b["advantages"], b["response_mask"],
                          counts=counts)
    with pytest.raises(TypeError, match="counts must be a GlobalBatchCounts"):
        policy_loss_share("dapo", b["log_probs"], b["old_log_probs"], b["advantages"], b["response_mask"],
                          counts={"num_sequences": 16})


def test_bad_counts():
    with pytest.raises(ValueError, match="num_sequences must be >= 1"):
        GlobalBatchCounts(num_sequences=0, num_tokens=0, max_response_length=4)
    with pytest.raises(ValueError, match="masks.* at least one micro-batch"):
        GlobalBatchCounts.from_masks([])
