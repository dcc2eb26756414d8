"""Actor checkpoints (model + optimizer) resume exactly, also into another parallel layout; bf16 training works.

Resume test: train 1 step, save, train 2 more (reference); then load the checkpoint into a fresh actor (same or
different layout) and train the same 2 steps. The SFT objective is used because it never clips, so the Adam moments
and step count visibly shape steps 2-3. Tolerance 1e-5 relative (fp32; only summation order differs).
"""
import pytest
import torch

from megatron_rl.actor.config import ActorConfig, OptimizerSettings
from megatron_rl.actor.megatron_actor import MegatronActor
from megatron_rl.checkpoint.model_ckpt import atomic_checkpoint_dir
from megatron_rl.parallel.layout import ParallelLayout
from megatron_rl.parallel.spawn import spawn_ranks
from tests.distributed.test_actor_invariance import make_batch, perturbed

pytestmark = pytest.mark.distributed


def _actor(path, layout, distributed_optimizer, dtype="float32"):
    return MegatronActor(ActorConfig(
        model_path=path, layout=ParallelLayout(**layout), dtype=dtype, max_tokens_per_microbatch=48,
        optimizer=OptimizerSettings(lr=1e-3, distributed_optimizer=distributed_optimizer, weight_decay=0.01),
    )).setup()


def _resume_rank(path, layout, distributed_optimizer, ckpt, mode):
    actor = _actor(path, layout, distributed_optimizer)
    batch = make_batch()
    if mode == "save":
        actor.train_step(batch, objective="sft")
        with atomic_checkpoint_dir(ckpt) as tmp:
            state = actor.save_checkpoint(tmp)
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            torch.save(state, ckpt + ".state.pt")
    else:
        state = torch.load(ckpt + ".state.pt", weights_only=True)
        actor.load_checkpoint(ckpt, state)
    steps = [actor.train_step(batch, objective="sft") for _ in range(2)]
    actor.shutdown()
    return [(m["loss"], m["grad_norm"]) for m in steps]


@pytest.mark.parametrize(
    "saved, loaded, world, dist_opt",
    [({"tp": 2}, {"pp": 2}, 2, False), ({}, {}, 2, True)],
    ids=["tp2-to-pp2", "distributed-optimizer-dp2"],
)
def test_resume_continues_exactly(tiny_model, tmp_path, saved, loaded, world, dist_opt):
    path, ckpt = tiny_model("qwen3"), str(tmp_path / "step")
    reference = spawn_ranks(_resume_rank, world, args=(path, saved, dist_opt, ckpt, "save"))[0]
    resumed = spawn_ranks(_resume_rank, world, args=(path, loaded, dist_opt, ckpt, "load"))[0]
    assert reference[1][1] != reference[0][1]  # the steps differ: the comparison is not trivially equal
    for (loss_a, gn_a), (loss_b, gn_b) in zip(reference, resumed):
        assert loss_b == pytest.approx(loss_a, rel=1e-5) and gn_b == pytest.approx(gn_a, rel=1e-5)


def _dtype_rank(path, dtype, layout):
    actor = _actor(path, layout, False, dtype)
    batch = make_batch()
    log_probs = actor.compute_log_probs(batch)
    holder = [log_probs]
    torch.distributed.broadcast_object_list(holder, src=0)
    batch.old_log_probs = perturbed(holder[0])
    metrics = actor.train_step(batch)
    dtypes = set()
    for bucket in actor.export_hf_weights(dst=0):
        dtypes.update(str(t.dtype) for _, t in bucket)
    actor.shutdown()
    return {"grad_norm": metrics["grad_norm"], "log_probs": holder[0], "dtypes": dtypes}


def test_bf16_step_tracks_fp32(tiny_model):
    """bf16 parameters (fp32 masters in the optimizer, fp32 logits): the same step within bf16 rounding."""
    path = tiny_model("qwen3")
    fp32 = spawn_ranks(_dtype_rank, 1, args=(path, "float32", {}))[0]
    bf16 = spawn_ranks(_dtype_rank, 2, args=(path, "bfloat16", {"tp": 2}))[0]
    assert bf16["dtypes"] == {"torch.bfloat16"} and fp32["dtypes"] == {"torch.float32"}
    assert bf16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=2e-2)
    diff = max(float((a - b).abs().max()) for a, b in zip(bf16["log_probs"], fp32["log_probs"]))
    assert 0 < diff < 0.1  # bf16 weights round the log-probs (|log p| ~ 6 here), but only slightly


def _fresh_rank(path, ckpt, mode):
    actor = _actor(path, {}, False)
    batch = make_batch()
    if mode == "save":  # saved before any optimizer step (e.g. every RL step so far was filtered empty)
        with atomic_checkpoint_dir(ckpt) as tmp:
            torch.save(actor.save_checkpoint(tmp), ckpt + ".state.pt")
    elif mode == "load":
        actor.load_checkpoint(ckpt, torch.load(ckpt + ".state.pt", weights_only=True))
    steps = [actor.train_step(batch, objective="sft")["grad_norm"] for _ in range(2)]
    actor.shutdown()
    return steps


def test_checkpoint_before_any_step_resumes_like_a_fresh_start(tiny_model, tmp_path):
    path, ckpt = tiny_model("qwen3"), str(tmp_path / "step")
    spawn_ranks(_fresh_rank, 1, args=(path, ckpt, "save"))
    fresh = spawn_ranks(_fresh_rank, 1, args=(path, ckpt, "fresh"))[0]
    resumed = spawn_ranks(_fresh_rank, 1, args=(path, ckpt, "load"))[0]
    assert resumed == pytest.approx(fresh, rel=1e-6)
