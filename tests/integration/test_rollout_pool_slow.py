"""Longer rollout-pool scenarios (marked slow; each starts its own engines):

- weights exported by `export_hf_weights` from a sharded Megatron Qwen3-MoE (EP=2 over two gloo ranks, parameters
  changed in Megatron) reach the engines, whose log-probs then match transformers on the exported tensors (1e-4);
- a hung engine (answer later than request_timeout_s) is killed and restarted with the current weights, its share
  re-issued, every sample returned once; one that keeps hanging makes the pool raise after max_attempts, and the
  pool works afterwards; one hung when a weight update starts times out of the gloo broadcast and is replaced with
  the new weights;
- logprobs_mode="raw_logprobs" reports log_softmax(logits) (temperature 1) whatever the sampling temperature;
- samples do not depend on the number of engines (per-prompt seeds).
"""
from __future__ import annotations

import time

import pytest
import torch

from megatron_rl.rollout import EngineConfig, RolloutError, RolloutPool, RolloutPoolConfig, SamplingConfig
from megatron_rl.cluster.ray_cluster import local_ray_cluster
from tests.integration.test_rollout_pool import (
    MODEL_SIZE,
    TEMPERATURE,
    TOL,
    Reference,
    hf_state_dict,
    perturbed,
    shuffled_buckets,
)

pytestmark = [pytest.mark.vllm, pytest.mark.ray, pytest.mark.slow]

PROMPTS = [[1, 87, 85, 270, 201, 282, 275, 268], [1, 67, 85, 85, 271, 86], [5, 6, 7, 8, 9], [300, 301, 302]]


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray_cluster(num_cpus=2):
        yield


def _pool(model_dir, num_engines=1, **pool_fields):
    engine_fields = {k: pool_fields.pop(k) for k in list(pool_fields) if k in EngineConfig.__dataclass_fields__}
    engine = EngineConfig(model=model_dir, dtype="float32", max_model_len=1024, **engine_fields)
    return RolloutPool(RolloutPoolConfig(engine, num_engines=num_engines, **pool_fields))


def export_changed_megatron_weights(hf_dir: str, bucket_bytes: int) -> list | None:
    """On each gloo rank: Megatron model from the checkpoint (EP=2), every local parameter changed, then
    export_hf_weights(dst=0) -> rank 0 returns the buckets (lists of (hf_name, tensor)), exactly what the trainer
    will hand to RolloutPool.update_weights."""
    import torch.distributed as dist

    from megatron_rl.models.verify import build_loaded_model
    from megatron_rl.models.weight_transfer import export_hf_weights
    from megatron_rl.parallel.layout import ParallelLayout
    from megatron_rl.parallel.state import destroy_parallel

    arch, chunks = build_loaded_model(hf_dir, ParallelLayout(ep=2))
    gen = torch.Generator().manual_seed(100 + dist.get_rank())
    with torch.no_grad():  # every parameter moves by 0.3 of its std (norm weights, std 0, by 0.3)
        for param in (p for chunk in chunks for p in chunk.parameters()):
            std = float(param.std()) if param.numel() > 1 else 0.0
            param.add_(0.3 * (std if std > 0 else 1.0) * torch.randn(param.shape, generator=gen))
    buckets = list(export_hf_weights(chunks, arch, bucket_bytes=bucket_bytes, dst=0))
    destroy_parallel()
    return [[(n, t.clone()) for n, t in b] for b in buckets] if dist.get_rank() == 0 else None


def test_megatron_export_reaches_the_engines(ray_cluster, tiny_model, tmp_path):
    from megatron_rl.parallel.spawn import spawn_ranks

    model_dir = tiny_model("qwen3_moe", **MODEL_SIZE)
    buckets = spawn_ranks(export_changed_megatron_weights, world_size=2, args=(model_dir, 16 * 1024))[0]
    exported = {name: t for bucket in buckets for name, t in bucket}
    old = hf_state_dict(model_dir)
    assert set(exported) == set(old) and len(buckets) > 3
    assert all(not torch.equal(exported[k], old[k]) for k in old), "Megatron did not change every tensor"

    reference = Reference(model_dir, str(tmp_path / "ref"))
    with _pool(model_dir) as pool:
        stats = pool.update_weights(buckets)
        assert stats.num_tensors == len(old)
        completions = pool.generate(PROMPTS, SamplingConfig(n=2, temperature=TEMPERATURE, max_tokens=24, seed=1))
    reference.load(old)
    assert reference.max_abs_diff(completions, TEMPERATURE) > 1e-2
    reference.load(exported)
    assert reference.max_abs_diff(completions, TEMPERATURE) <= TOL


def test_hung_engine_is_replaced_with_the_current_weights(ray_cluster, tiny_model, tmp_path):
    """Engine 1 stops answering the pool: it is kept busy by a long request sent to it directly (its actor runs one
    call at a time, so the pool's share waits behind it). After timeout_s the pool kills it, restarts it with the
    updated weights and re-issues its share: every sample comes back once, the same samples as without the hang
    (per-prompt seeds), with log-probs of the updated weights; the hung call's answer is never read."""
    import ray

    model_dir = tiny_model("qwen3", **MODEL_SIZE)
    new = perturbed(hf_state_dict(model_dir), seed=4)
    reference = Reference(model_dir, str(tmp_path / "ref"))
    reference.load(new)
    sampling = SamplingConfig(n=2, temperature=TEMPERATURE, max_tokens=16, seed=2)
    with _pool(model_dir, num_engines=2) as pool:
        pool.update_weights(shuffled_buckets(new, bucket_bytes=64 * 1024))
        expected = pool.generate(PROMPTS, sampling)
        victim = pool.engine_handles()[1]
        # ~2000 sequences of up to 900 tokens: minutes of work, far longer than the 20 s timeout below
        blocker = victim.generate.remote(
            [(i, PROMPTS[i % len(PROMPTS)]) for i in range(256)], SamplingConfig(n=8, max_tokens=900, seed=0)
        )
        got = pool.generate(PROMPTS, sampling, timeout_s=20.0)
        assert pool.stats.timeouts == 1 and pool.stats.restarts == 1 and pool.stats.reissued_shares == 1
        assert pool.engine_handles()[1] is not victim
        keys = [(c.prompt_index, c.sample_index) for c in got]
        assert keys == [(p, s) for p in range(len(PROMPTS)) for s in range(2)]
        assert [c.token_ids for c in got] == [c.token_ids for c in expected]
        assert {c.engine_id for c in got} == {0, 1}
        assert reference.max_abs_diff(got, TEMPERATURE) <= TOL  # the restarted engine holds the updated weights
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(blocker, timeout=60)


def test_engine_hung_during_an_update_times_out_and_is_replaced(ray_cluster, tiny_model, tmp_path):
    """Engine 1 is busy (a long request sent to it directly) when an update starts, so it never enters the gloo
    broadcast: the sender's wait for it times out after weight_sync_timeout_s, engine 0 completes the update, and
    the pool replaces engine 1 and replays the update to it. The update returns within a bounded time (the broadcast
    timeout, the finish deadline and one restart), not after the hung request."""
    import ray

    model_dir = tiny_model("qwen3", **MODEL_SIZE)
    new = perturbed(hf_state_dict(model_dir), seed=6)
    reference = Reference(model_dir, str(tmp_path / "ref"))
    reference.load(new)
    timeout_s = 10.0
    with _pool(model_dir, num_engines=2, weight_sync_timeout_s=timeout_s) as pool:
        victim = pool.engine_handles()[1]
        blocker = victim.generate.remote(  # minutes of work
            [(i, PROMPTS[i % len(PROMPTS)]) for i in range(256)], SamplingConfig(n=8, max_tokens=900, seed=0)
        )
        start = time.perf_counter()
        stats = pool.update_weights(shuffled_buckets(new, bucket_bytes=64 * 1024))
        elapsed = time.perf_counter() - start
        assert stats.restarted_engines == [1] and pool.engine_handles()[1] is not victim
        assert elapsed < 2 * timeout_s + pool.config.startup_timeout_s, elapsed
        got = pool.generate(PROMPTS, SamplingConfig(n=2, temperature=TEMPERATURE, max_tokens=16, seed=2))
        assert {c.engine_id for c in got} == {0, 1}
        assert reference.max_abs_diff(got, TEMPERATURE) <= TOL
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(blocker, timeout=60)


def test_engine_failing_before_a_broadcast_does_not_hold_the_sender(ray_cluster, tiny_model, monkeypatch):
    """Engine 1's update_weights raises before it joins the second bucket's broadcast (an injected fault): the
    sender sees the call end and gives up on that broadcast at once instead of waiting out the timeout; the update
    fails with the engine's error, and the next one succeeds on both engines."""
    import json

    model_dir = tiny_model("qwen3", **MODEL_SIZE)
    monkeypatch.setenv("MEGATRON_RL_FAULTS", json.dumps(
        [{"point": "engine.load_bucket", "action": "raise", "rank": 1, "call": 2}]))
    timeout_s = 120.0
    with _pool(model_dir, num_engines=2, weight_sync_timeout_s=timeout_s) as pool:
        state = hf_state_dict(model_dir)
        start = time.perf_counter()
        with pytest.raises(RolloutError, match="FaultInjected"):
            pool.update_weights(shuffled_buckets(state, bucket_bytes=64 * 1024))
        assert time.perf_counter() - start < timeout_s / 4
        stats = pool.update_weights(shuffled_buckets(state, bucket_bytes=64 * 1024))
        assert stats.restarted_engines == [] and len(pool.generate(PROMPTS, SamplingConfig(n=1, max_tokens=4))) == 4


def test_hung_engine_is_restarted_then_the_pool_gives_up(ray_cluster, tiny_model):
    """An engine busier than the request timeout counts as hung: killed, restarted, share re-issued; after
    max_attempts tries the pool raises RolloutError, and the restarted engine serves the next call (with the
    default timeout: a fresh engine's first batch is slow on a loaded machine)."""
    model_dir = tiny_model("qwen3", **MODEL_SIZE)
    with _pool(model_dir, max_attempts=2) as pool:
        long_batch = PROMPTS * 16
        with pytest.raises(RolloutError, match="failed 2 times"):
            pool.generate(long_batch, SamplingConfig(n=8, max_tokens=512, seed=0), timeout_s=3.0)
        assert pool.stats.timeouts == 2 and pool.stats.restarts == 2 and pool.stats.reissued_shares == 1
        short = pool.generate(PROMPTS, SamplingConfig(n=1, max_tokens=4, seed=0))
        assert len(short) == len(PROMPTS)


def test_raw_logprobs_mode_reports_the_untempered_model(ray_cluster, tiny_model, tmp_path):
    model_dir = tiny_model("qwen3", **MODEL_SIZE)
    reference = Reference(model_dir, str(tmp_path / "ref"))
    with _pool(model_dir, logprobs_mode="raw_logprobs") as pool:
        sampling = SamplingConfig(n=2, temperature=TEMPERATURE, top_p=0.8, max_tokens=24, seed=3)
        completions = pool.generate(PROMPTS, sampling)
    assert reference.max_abs_diff(completions, 1.0) <= TOL
    assert reference.max_abs_diff(completions, TEMPERATURE) > 1e-2


def test_samples_do_not_depend_on_the_number_of_engines(ray_cluster, tiny_model):
    model_dir = tiny_model("qwen3_moe", **MODEL_SIZE)
    sampling = SamplingConfig(n=3, temperature=1.0, max_tokens=32, seed=11)
    runs = []
    for engines in (1, 2):
        with _pool(model_dir, num_engines=engines) as pool:
            runs.append(pool.generate(PROMPTS * 2, sampling))
    assert {c.engine_id for c in runs[1]} == {0, 1}
    assert [c.token_ids for c in runs[0]] == [c.token_ids for c in runs[1]]
    worst = max(abs(a - b) for x, y in zip(*runs) for a, b in zip(x.logprobs, y.logprobs))
    assert worst <= TOL  # same tokens; log-probs equal up to batch-shape rounding
