"""Weight sync: `RolloutPool.update_weights` seconds vs the model's bytes, against a memcpy of the same bytes and
against vLLM's own reload.

`weight_sync_rows` returns rows (dicts) for a table; `tools/benchmark.py sync` prints them.

A full model (every HF tensor, perturbed so the engines really change) goes through the pool in buckets of a given
size, per transport (gloo broadcast, Ray object store; docs/rollout.md), compared with (a) a plain in-memory copy of the same bytes (`dst.copy_(src)` per tensor into preallocated
tensors, one process): the floor for moving those bytes once, and (b) vLLM's own `worker.reload_weights` of the
same tensors in one in-process engine (no Ray, no transport): the floor set by vLLM's loading and weight
processing, which every update pays.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch

from megatron_rl.benchmarks.rollout import BareLLM
from megatron_rl.rollout.config import EngineConfig, RolloutPoolConfig


def bucketed(state: dict[str, torch.Tensor], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """The tensors of `state` in order, cut into buckets of at most `bucket_bytes` (a bigger tensor is alone)."""
    buckets, bucket, size = [], [], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            buckets.append(bucket)
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    return buckets + ([bucket] if bucket else [])


def memcpy_seconds(state: dict[str, torch.Tensor], repeats: int = 10) -> float:
    """Fastest of `repeats` copies of every tensor into preallocated, already touched tensors (the floor)."""
    targets = {k: v.clone() for k, v in state.items()}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for k, v in state.items():
            targets[k].copy_(v)
        times.append(time.perf_counter() - start)
    return min(times)


def weight_sync_rows(
    model_dirs: list[str],
    *,
    engine_counts: tuple[int, ...] = (1, 2),
    bucket_sizes: tuple[int, ...] = (1 << 20, 64 << 20),
    repeats: int = 3,
    dtype: str = "float32",
    transports: tuple[str, ...] = ("gloo", "object_store"),
) -> list[dict[str, Any]]:
    """One row per (model, transport, engine count, bucket size): update_weights seconds vs a memcpy of the same
    bytes and vs vLLM's own reload in one in-process engine. Needs a running Ray cluster with at least
    max(engine_counts) CPUs."""
    from safetensors.torch import load_file

    from megatron_rl.rollout.pool import RolloutPool

    rows = []
    for model_dir in model_dirs:
        state = load_file(os.path.join(model_dir, "model.safetensors"))
        versions = [{k: v + 0.01 * (i + 1) for k, v in state.items()} for i in range(2)]  # real changes each time
        num_bytes = sum(v.numel() * v.element_size() for v in state.values())
        floor = memcpy_seconds(state)
        engine = EngineConfig(model=model_dir, dtype=dtype, max_model_len=256)
        bare = BareLLM(engine)
        try:
            reload_s = statistics.median(
                [bare.reload_seconds(model_dir, 0.01 * (r % 2 + 1)) for r in range(repeats + 1)][1:]
            )
        finally:
            bare.close()
        for transport, engines in ((t, e) for t in transports for e in engine_counts):
            pool = RolloutPool(RolloutPoolConfig(engine, num_engines=engines, transport=transport))
            try:
                for bucket_bytes in bucket_sizes:
                    times, engine_times, num_buckets = [], [], 0
                    for r in range(repeats + 1):  # the first is a warm-up
                        stats = pool.update_weights(bucketed(versions[r % 2], bucket_bytes))
                        if r:
                            times.append(stats.seconds)
                            engine_times.append(max(stats.engine_seconds.values()))
                        num_buckets = stats.num_buckets
                    sync = statistics.median(times)
                    rows.append({
                        "model": os.path.basename(model_dir.rstrip("/")),
                        "tensors": len(state),
                        "transport": transport,
                        "MiB": round(num_bytes / 2**20, 1),
                        "engines": engines,
                        "bucket_MiB": round(bucket_bytes / 2**20, 1),
                        "buckets": num_buckets,
                        "sync_s": round(sync, 4),
                        "slowest_engine_s": round(statistics.median(engine_times), 4),
                        "sync_GiB_s": round(num_bytes / 2**30 / sync, 2),
                        "vllm_reload_s": round(reload_s, 4),
                        "memcpy_s": round(floor, 5),
                        "sync/vllm_reload": round(sync / reload_s, 1),
                        "sync/memcpy": round(sync / floor, 1),
                    })
            finally:
                pool.shutdown()
    return rows
