"""Bytes sent over the context-parallel (CP) group per step by GSPO/LUSPO's sequence reduction, compared with
all-gathering the per-token log-probs; optionally times both collectives on real gloo ranks.

    python tools/bench_cp_reduction.py                 # table for realistic sizes + gloo timing (small size)
    python tools/bench_cp_reduction.py --no-timing     # table only

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

import argparse
import os
import platform
import sys
import time

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


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def byte_table() -> str:
    lines = [
        "| sequences | response len | CP | ours: all-reduce [B,2] fp32 | all-gather [B,T] fp32 logp | ratio |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for b, t, cp in SIZES:
        ours = ring_allreduce_bytes(b * 2 * FP32, cp)
        gather = ring_allgather_bytes(b * t * FP32, cp)
        lines.append(f"| {b} | {t} | {cp} | {human(ours)} | {human(gather)} | {gather / ours:,.0f}x |")
    return "\n".join(lines)


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


def timing_table(rows: int, width: int, cp: int, repeats: int) -> str:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_rl.parallel.spawn import spawn_ranks

    results = spawn_ranks(_time_collectives, cp, args=(rows, width, repeats), timeout=600)
    reduce_s = max(r["all_reduce"] for r in results)
    gather_s = max(r["all_gather"] for r in results)
    return "\n".join([
        f"Real gloo collectives, {cp} local ranks (one process each), {rows} sequences x {width} tokens, fp32, "
        f"mean over {repeats} back-to-back calls (slowest rank):",
        "",
        "| collective | per-rank payload | time per call |",
        "|---|---:|---:|",
        f"| all-reduce [B, 2] (ours) | {human(rows * 2 * FP32)} | {reduce_s * 1e3:.3f} ms |",
        f"| all-gather [B, T/cp] log-probs | {human(rows * width // cp * FP32)} | {gather_s * 1e3:.3f} ms |",
        f"| ratio | | {gather_s / reduce_s:.1f}x |",
    ])


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    python, cores = platform.python_version(), os.cpu_count()
    return f"{platform.node()}: {cpu}, {cores} cores, Python {python}, torch {torch.__version__}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-timing", action="store_true", help="print the byte table only")
    parser.add_argument("--rows", type=int, default=256, help="sequences for the gloo timing")
    parser.add_argument("--width", type=int, default=8192, help="response length for the gloo timing")
    parser.add_argument("--cp", type=int, default=2, help="CP ranks for the gloo timing (<= CPU cores is fair)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"Machine: {machine()}")
    print()
    print("Bytes on the wire per CP group per step (ring algorithms, summed over the CP ranks):")
    print()
    print(byte_table())
    if not args.no_timing:
        print()
        print(timing_table(args.rows, args.width, args.cp, args.repeats))


if __name__ == "__main__":
    main()
