"""Weight refit from the live Megatron actor: owner sends vs the driver's stream, the same pool, the same engines.

`refit_rows` returns rows (dicts) for a table; `tools/benchmark.py refit` prints them.

For each model and actor layout (1 rank, or PP2 over 2 ranks) an `ActorGroup` is loaded from the checkpoint and a
pool of real engines is started; then, alternating, `pool.sync_weights(group.weight_buckets(b))` ("driver": actor
rank 0 gathers every bucket, streams it to the driver through Ray, the driver's gloo transport sends it) and
`pool.sync_weights(group.weight_owners(b))` ("owners": each owner rank sends its own buckets straight to the
engines; docs/rollout.md, "Owner sends"). Baselines measured in the same run: a memcpy of the model's bytes (the
floor for moving them once) and the engine's own share of the update (`slowest_engine_s`: vLLM's load of the
received buckets).

`colocated_refit_rows` (`tools/benchmark.py refit --colocate`): engines colocated with the actor ranks (one per rank,
in the actor's placement group), owner sends over "gloo" (each owner broadcasts its share over loopback TCP) vs
"ipc" (each rank hands every whole bucket to the engine beside it through a shared buffer: /dev/shm here), two
pools on the same actor and bundles, alternating.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Iterator

from megatron_rl.benchmarks.sync import memcpy_seconds
from megatron_rl.rollout.config import EngineConfig, RolloutPoolConfig

SENDERS = ("driver", "owners")
COLOCATED_TRANSPORTS = ("gloo", "ipc")


def refit_rows(
    model_dirs: list[str],
    *,
    layouts: tuple[str, ...] = ("1", "pp2"),
    engine_counts: tuple[int, ...] = (1, 2),
    bucket_bytes: int = 64 << 20,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """One row per (model, layout, engine count, sender): median sync seconds over `repeats` (after one warm-up
    each), ratios to a memcpy and driver/owners. Needs a running Ray cluster with ranks + max(engine_counts) CPUs."""
    from megatron_rl.rollout.pool import RolloutPool

    rows = []
    for setting, floor, engine, _, group in _actors(model_dirs, layouts):
        for engines in engine_counts:
            pool = RolloutPool(RolloutPoolConfig(engine, num_engines=engines))
            try:
                syncs = {sender: (lambda sender=sender: pool.sync_weights(group.weights(sender, bucket_bytes)))
                         for sender in SENDERS}
                rows += _alternated_rows(syncs, repeats, {**setting, "engines": engines}, "sender", bucket_bytes,
                                         floor, "[refit]")
            finally:
                pool.shutdown()
    return rows


def colocated_refit_rows(
    model_dirs: list[str],
    *,
    layouts: tuple[str, ...] = ("1", "pp2"),
    bucket_bytes: int = 64 << 20,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """One row per (model, layout, transport): owner sends to engines colocated with the actor ranks (one per rank),
    median sync seconds over `repeats` (after one warm-up each), ratios to a memcpy and gloo/ipc. Needs a running
    Ray cluster with one CPU per actor rank (colocated engines take none)."""
    from megatron_rl.cluster.placement import ColocatedPlacement
    from megatron_rl.rollout.pool import RolloutPool

    rows = []
    for setting, floor, engine, ranks, group in _actors(model_dirs, layouts):
        pools = {}
        try:
            placement = ColocatedPlacement.on(group.placement_group, ranks, ranks, 1)
            for transport in COLOCATED_TRANSPORTS:
                pools[transport] = RolloutPool(RolloutPoolConfig(engine, num_engines=ranks, transport=transport,
                                                                 colocate=True), colocated_with=placement)
            syncs = {t: (lambda t=t: pools[t].sync_weights(group.weight_owners(bucket_bytes, transport=t)))
                     for t in COLOCATED_TRANSPORTS}
            rows += _alternated_rows(syncs, repeats, {**setting, "engines": ranks}, "transport", bucket_bytes, floor,
                                     "[refit colocated]")
        finally:
            for pool in pools.values():
                pool.shutdown()
    return rows


def _actors(model_dirs: list[str], layouts: tuple[str, ...]) -> Iterator[tuple[dict[str, Any], float, Any, int, Any]]:
    """For each model and actor layout ("1": one rank, "pp2": PP2 over two ranks): (the row's model, MiB and actor
    fields, a memcpy of the model's bytes in seconds, the engines' EngineConfig, the number of ranks, a live
    ActorGroup loaded from the checkpoint, shut down when the caller moves on)."""
    from safetensors.torch import load_file

    from megatron_rl.actor.config import ActorConfig
    from megatron_rl.actor.ray_group import ActorGroup
    from megatron_rl.parallel.layout import ParallelLayout

    for model_dir in model_dirs:
        state = load_file(os.path.join(model_dir, "model.safetensors"))
        num_bytes = sum(v.numel() * v.element_size() for v in state.values())
        floor = memcpy_seconds(state)
        del state
        engine = EngineConfig(model=model_dir, dtype="float32", max_model_len=256)
        for layout in layouts:
            ranks = 2 if layout == "pp2" else 1
            layout_fields = {"pp": 2} if layout == "pp2" else {}
            group = ActorGroup(ActorConfig(model_path=model_dir, layout=ParallelLayout(**layout_fields)),
                               world_size=ranks)
            try:
                yield ({"model": os.path.basename(model_dir.rstrip("/")), "MiB": round(num_bytes / 2**20, 1),
                        "actor": layout}, floor, engine, ranks, group)
            finally:
                group.shutdown()


def _alternated_rows(syncs: dict[str, Any], repeats: int, setting: dict[str, Any], label: str, bucket_bytes: int,
                     floor: float, tag: str) -> list[dict[str, Any]]:
    """Run each variant's sync (name -> a call returning the pool's WeightSyncStats) in turn, `repeats` + 1 rounds
    (the first a warm-up: connections), and one row per variant: `setting`, the variant under `label`, the median
    sync and slowest-engine seconds, the ratio to a memcpy (`floor`) and the first variant's time over this one's."""
    times = {name: [] for name in syncs}
    engine_times = {name: [] for name in syncs}
    for r in range(repeats + 1):
        for name, sync in syncs.items():
            start = time.perf_counter()
            stats = sync()
            if r:
                times[name].append(time.perf_counter() - start)
                engine_times[name].append(max(stats.engine_seconds.values()))
    first = next(iter(syncs))
    base = statistics.median(times[first])
    print(f"{tag} {setting['model']} actor {setting['actor']} engines {setting['engines']}: " +
          ", ".join(f"{name} {statistics.median(times[name]):.3f}s" for name in syncs), flush=True)
    rows = []
    for name in syncs:
        sync_s = statistics.median(times[name])
        rows.append({**setting, label: name, "bucket_MiB": round(bucket_bytes / 2**20, 1), "sync_s": round(sync_s, 4),
                     "slowest_engine_s": round(statistics.median(engine_times[name]), 4), "memcpy_s": round(floor, 5),
                     "sync/memcpy": round(sync_s / floor, 1), f"{first}/this": round(base / sync_s, 2)})
    return rows
