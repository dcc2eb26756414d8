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
from typing import Any

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
    from safetensors.torch import load_file

    from megatron_rl.actor.config import ActorConfig
    from megatron_rl.actor.ray_group import ActorGroup
    from megatron_rl.parallel.layout import ParallelLayout
    from megatron_rl.rollout.pool import RolloutPool

    rows = []
    for model_dir in model_dirs:
        state = load_file(os.path.join(model_dir, "model.safetensors"))
        num_bytes = sum(v.numel() * v.element_size() for v in state.values())
        floor = memcpy_seconds(state)
        del state
        engine = EngineConfig(model=model_dir, dtype="float32", max_model_len=256)
        for layout in layouts:
            fields = {"pp": 2} if layout == "pp2" else {}
            ranks = 2 if layout == "pp2" else 1
            group = ActorGroup(ActorConfig(model_path=model_dir, layout=ParallelLayout(**fields)), world_size=ranks)
            try:
                for engines in engine_counts:
                    pool = RolloutPool(RolloutPoolConfig(engine, num_engines=engines))
                    try:
                        times = {s: [] for s in SENDERS}
                        engine_times = {s: [] for s in SENDERS}
                        for r in range(repeats + 1):  # the first round of each is a warm-up (connections)
                            for sender in SENDERS:
                                start = time.perf_counter()
                                stats = pool.sync_weights(group.weights(sender, bucket_bytes))
                                if r:
                                    times[sender].append(time.perf_counter() - start)
                                    engine_times[sender].append(max(stats.engine_seconds.values()))
                        driver_s = statistics.median(times["driver"])
                        print(f"[refit] {os.path.basename(model_dir)} actor {layout} engines {engines}: " +
                              ", ".join(f"{s} {statistics.median(times[s]):.3f}s" for s in SENDERS), flush=True)
                        for sender in SENDERS:
                            sync = statistics.median(times[sender])
                            rows.append({
                                "model": os.path.basename(model_dir.rstrip("/")),
                                "MiB": round(num_bytes / 2**20, 1),
                                "actor": layout,
                                "engines": engines,
                                "sender": sender,
                                "bucket_MiB": round(bucket_bytes / 2**20, 1),
                                "sync_s": round(sync, 4),
                                "slowest_engine_s": round(statistics.median(engine_times[sender]), 4),
                                "memcpy_s": round(floor, 5),
                                "sync/memcpy": round(sync / floor, 1),
                                "driver/this": round(driver_s / sync, 2),
                            })
                    finally:
                        pool.shutdown()
            finally:
                group.shutdown()
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
    from safetensors.torch import load_file

    from megatron_rl.actor.config import ActorConfig
    from megatron_rl.actor.ray_group import ActorGroup
    from megatron_rl.cluster.placement import ColocatedPlacement
    from megatron_rl.parallel.layout import ParallelLayout
    from megatron_rl.rollout.pool import RolloutPool

    rows = []
    for model_dir in model_dirs:
        state = load_file(os.path.join(model_dir, "model.safetensors"))
        num_bytes = sum(v.numel() * v.element_size() for v in state.values())
        floor = memcpy_seconds(state)
        del state
        engine = EngineConfig(model=model_dir, dtype="float32", max_model_len=256)
        for layout in layouts:
            fields = {"pp": 2} if layout == "pp2" else {}
            ranks = 2 if layout == "pp2" else 1
            group = ActorGroup(ActorConfig(model_path=model_dir, layout=ParallelLayout(**fields)), world_size=ranks)
            pools = {}
            try:
                placement = ColocatedPlacement.on(group.placement_group, ranks, ranks, 1)
                for transport in COLOCATED_TRANSPORTS:
                    pools[transport] = RolloutPool(RolloutPoolConfig(engine, num_engines=ranks, transport=transport,
                                                                     colocate=True), colocated_with=placement)
                times = {t: [] for t in COLOCATED_TRANSPORTS}
                engine_times = {t: [] for t in COLOCATED_TRANSPORTS}
                for r in range(repeats + 1):  # the first round of each is a warm-up (connections)
                    for transport, pool in pools.items():
                        start = time.perf_counter()
                        stats = pool.sync_weights(group.weight_owners(bucket_bytes, transport=transport))
                        if r:
                            times[transport].append(time.perf_counter() - start)
                            engine_times[transport].append(max(stats.engine_seconds.values()))
                gloo_s = statistics.median(times["gloo"])
                print(f"[refit colocated] {os.path.basename(model_dir)} actor {layout} engines {ranks}: " +
                      ", ".join(f"{t} {statistics.median(times[t]):.3f}s" for t in COLOCATED_TRANSPORTS), flush=True)
                for transport in COLOCATED_TRANSPORTS:
                    sync = statistics.median(times[transport])
                    rows.append({
                        "model": os.path.basename(model_dir.rstrip("/")),
                        "MiB": round(num_bytes / 2**20, 1),
                        "actor": layout,
                        "engines": ranks,
                        "transport": transport,
                        "bucket_MiB": round(bucket_bytes / 2**20, 1),
                        "sync_s": round(sync, 4),
                        "slowest_engine_s": round(statistics.median(engine_times[transport]), 4),
                        "memcpy_s": round(floor, 5),
                        "sync/memcpy": round(sync / floor, 1),
                        "gloo/this": round(gloo_s / sync, 2),
                    })
            finally:
                for pool in pools.values():
                    pool.shutdown()
                group.shutdown()
    return rows
