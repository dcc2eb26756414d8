"""The KL reference can be reset to the policy (after the supervised warm-up) and survives a checkpoint round trip.

One actor in bf16 at TP=2, so the policy is DDP(Float16Module(GPTModel)) and each rank holds half of every
TP-split weight, while the reference is a bare GPTModel in the same layout. After two SFT steps the policy moved
away from the reference; `reset_reference_to_policy()` makes the reference compute exactly the policy's log-probs
(same weights, same layout, same kernels: bit-equal); a further policy step leaves it where it was (a copy, not an
alias); and a fresh actor that loads the training checkpoint gets the reset reference back, not model.path's.
"""
import pytest

from megatron_rl.actor.config import ActorConfig, OptimizerSettings, PolicyLossSettings
from megatron_rl.actor.megatron_actor import MegatronActor
from megatron_rl.checkpoint.names import REFERENCE_DIR
from megatron_rl.checkpoint.model_ckpt import atomic_checkpoint_dir
from megatron_rl.parallel.layout import ParallelLayout
from megatron_rl.parallel.spawn import spawn_ranks
from tests.distributed.test_actor_invariance import make_batch

pytestmark = pytest.mark.distributed


def _actor(path):
    return MegatronActor(ActorConfig(
        model_path=path, layout=ParallelLayout(tp=2), dtype="bfloat16", max_tokens_per_microbatch=256,
        optimizer=OptimizerSettings(lr=1e-2, weight_decay=0.0), loss=PolicyLossSettings(kl_coef=0.01),
    )).setup()


def _log_probs(actor, batch):
    return {name: actor.compute_log_probs(batch, model=name) for name in ("policy", "reference")}


def _reset_rank(path, ckpt, mode):
    actor = _actor(path)
    batch = make_batch()
    out = {}
    if mode == "train":
        out["initial"] = _log_probs(actor, batch)
        for _ in range(2):
            actor.train_step(batch, objective="sft")
        out["trained"] = _log_probs(actor, batch)
        actor.reset_reference_to_policy()
        out["reset"] = _log_probs(actor, batch)
        actor.train_step(batch, objective="sft")
        out["after_step"] = _log_probs(actor, batch)
        with atomic_checkpoint_dir(ckpt) as tmp:
            out["state"] = actor.save_checkpoint(tmp)
    else:
        actor.load_checkpoint(ckpt, mode)  # mode: the saved actor state
        out["loaded"] = _log_probs(actor, batch)
    actor.shutdown()
    return out


def _max_diff(a, b):
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def test_reset_reference_copies_the_policy_and_is_checkpointed(tiny_model, tmp_path):
    path, ckpt = tiny_model("qwen3"), str(tmp_path / "step")
    got = spawn_ranks(_reset_rank, 2, args=(path, ckpt, "train"))[0]
    initial, trained, reset, after = got["initial"], got["trained"], got["reset"], got["after_step"]
    # both start from model.path: bit-equal (same weights and code path)
    assert _max_diff(initial["policy"], initial["reference"]) == 0.0
    # two SFT steps at lr 1e-2 move the policy by O(0.1) nats per token; the reference has not moved
    assert _max_diff(trained["policy"], trained["reference"]) > 1e-2
    assert _max_diff(trained["reference"], initial["reference"]) == 0.0
    # after the reset: the reference IS the trained policy (identical shards, identical kernels: bit-equal)
    assert _max_diff(reset["reference"], trained["policy"]) == 0.0
    # one more policy step moves the policy but not the reference (copied, not aliased)
    assert _max_diff(after["policy"], reset["policy"]) > 1e-2
    assert _max_diff(after["reference"], reset["reference"]) == 0.0

    assert got["state"]["reference_saved"] is True
    assert (tmp_path / "step" / REFERENCE_DIR / "megatron_rl.json").is_file()
    loaded = spawn_ranks(_reset_rank, 2, args=(path, ckpt, got["state"]))[0]["loaded"]
    # a fresh actor (reference built from model.path) gets the saved reference and policy back exactly
    assert _max_diff(loaded["reference"], reset["reference"]) == 0.0
    assert _max_diff(loaded["policy"], after["policy"]) == 0.0


def test_reset_without_a_reference_model_is_an_error(tiny_model):
    actor = MegatronActor(ActorConfig(model_path=tiny_model("qwen3")))  # kl_coef 0: no reference is ever built
    with pytest.raises(ValueError, match=r"actor.loss.kl_coef > 0"):
        actor.reset_reference_to_policy()
