"""Bytes sent over the context-parallel (CP) group per step by GSPO/LUSPO's sequence reduction, compared with
all-gathering the per-token log-probs; and a timing of both collectives on real gloo ranks.

What is compared (per CP group, per optimizer step, for the B sequences that CP group trains on):
  ours        one all-reduce of [B, 2] (masked log-ratio sum and token count per sequence),
              `megatron_rl.algorithms.context_parallel.reduce_sequence_sums`
  all-gather  every rank gathers the other ranks' [B, T/cp] per-token log-probs (forward only; a
              differentiable all-gather also needs a reduce-scatter of the same size in backward)
Bytes are those a ring algorithm (NCCL / gloo ring) puts on the wire, summed over the cp ranks:
all-reduce of n bytes: 2 (cp - 1) / cp * n per rank; all-gather of n bytes in total: (cp - 1) / cp * n per rank.
The ratio is therefore T * bytes(logp) / (4 * bytes(sum)) = T / 4 for fp32 both sides, independent of B and cp.
"""
from __future__ import annotations

import time
from typing import Any

import torch

# Realistic sizes: (sequences per CP group per step, padded response length, cp size).
SIZES = [
    (256, 8192, 4),
    (256, 8192, 2),
    (256, 16384, 8),
    (128, 32768, 4),
    (512, 4096, 2),
    (64, 65536, 8),
]
FP32 = 4


def ring_allreduce_bytes(payload: int, cp: int) -> int:
    return 2 * (cp - 1) * payload  # summed over the cp ranks: each sends 2 (cp-1)/cp * payload


def ring_allgather_bytes(total: int, cp: int) -> int:
    return (cp - 1) * total  # summed over the cp ranks: each sends (cp-1)/cp * total


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def byte_rows(sizes=SIZES) -> list[dict[str, Any]]:
    """One row per (sequences, response length, cp): ring bytes of our all-reduce vs the log-prob all-gather."""
    rows = []
    for b, t, cp in sizes:
        ours = ring_allreduce_bytes(b * 2 * FP32, cp)
        gather = ring_allgather_bytes(b * t * FP32, cp)
        rows.append({
            "sequences": b, "response len": t, "CP": cp,
            "ours: all-reduce [B,2] fp32": human_bytes(ours),
            "all-gather [B,T] fp32 logp": human_bytes(gather),
            "ratio": f"{gather / ours:,.0f}x",
        })
    return rows


def _time_collectives(rows: int, width: int, repeats: int) -> dict:
    """On each gloo rank: seconds per call of the [rows, 2] all-reduce and of the [rows, width/cp] all-gather,
    each timed over `repeats` back-to-back calls (so one rank's scheduling delay is averaged out)."""
    import torch.distributed as dist

    from megatron_rl.algorithms.context_parallel import gather_from_cp, reduce_sequence_sums

    cp = dist.get_world_size()
    local_sums = torch.randn(rows, 2)
    local_logp = torch.randn(rows, width // cp)
    calls = {"all_reduce": lambda: reduce_sequence_sums(local_sums, dist.group.WORLD),
             "all_gather": lambda: gather_from_cp(local_logp, dist.group.WORLD)}
    out = {}
    for name, call in calls.items():
        for _ in range(3):  # warm up connections and allocator
            call()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        dist.barrier()
        out[name] = (time.perf_counter() - start) / repeats
    return out


def timing_rows(rows: int = 256, width: int = 8192, cp: int = 2, repeats: int = 30) -> list[dict[str, Any]]:
    """Both collectives on `cp` local gloo ranks (one process each); seconds per call of the slowest rank."""
    from megatron_rl.parallel.spawn import spawn_ranks

    results = spawn_ranks(_time_collectives, cp, args=(rows, width, repeats), timeout=600)
    reduce_s = max(r["all_reduce"] for r in results)
    gather_s = max(r["all_gather"] for r in results)
    return [
        {"collective": "all-reduce [B, 2] (ours)", "per-rank payload": human_bytes(rows * 2 * FP32),
         "ms per call": round(reduce_s * 1e3, 3)},
        {"collective": "all-gather [B, T/cp] log-probs", "per-rank payload": human_bytes(rows * width // cp * FP32),
         "ms per call": round(gather_s * 1e3, 3)},
        {"collective": "ratio all-gather / ours", "per-rank payload": "", "ms per call": round(gather_s / reduce_s, 1)},
    ]
