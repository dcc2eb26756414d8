"""`megatron-rl replay-step`: re-run one logged RL step's update without any engine, to investigate it.

The actor is rebuilt in the run's layout, loaded from the checkpoint written right before the step, given the step's
saved batch (logging.save_rollouts) and updated with the same code as training (training/update.py); the loss and
gradient norm are compared with the ones metrics.jsonl logged for that step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

EPILOG = """\
examples:
  megatron-rl replay-step --run runs/quickstart --step 12
  megatron-rl replay-step --run runs/my_run --step 340 --tolerance 1e-6      # another machine / thread count

Needs: the run's resolved config (<run>/config.yaml, paths relative to the directory training ran in), the step's
batch (<run>/rollouts/step_N.parquet: train with logging.save_rollouts=true) and the checkpoint of step N-1
(<run>/checkpoints/step_<N-1>: checkpoint.every=1 and a large enough checkpoint.keep_last around the steps you may
want to replay). Exit status: 0 reproduced (within --tolerance, default 0: bit for bit), 1 differs,
2 something needed is missing."""

COMPARED = ("train/loss", "train/grad_norm")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "replay-step", help="re-run a logged step's update from its checkpoint and saved batch (no engines)",
        description="Rebuild the actor from the checkpoint before step N, re-run step N's update on the batch the "
                    "run saved, and compare the loss and gradient norm with the logged ones.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", dest="run_dir", required=True, help="the run directory (runs/<run.name>)")
    p.add_argument("--step", required=True, type=int, help="the RL step to replay (>= 1)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="largest relative difference accepted (default 0: the same machine reproduces exactly)")
    p.set_defaults(run=run)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    from megatron_rl.checkpoint.names import CHECKPOINTS_DIR, RUN_CONFIG, TRAINER_STATE
    from megatron_rl.checkpoint.run_state import list_checkpoints, step_dir
    from megatron_rl.config import ConfigError, load_config
    from megatron_rl.training.metrics_logger import read_jsonl
    from megatron_rl.training.recorder import ROLLOUTS_DIR, load_step_batch, step_file

    if args.step < 1:
        return _fail(f"--step must be >= 1, got {args.step}")
    if not os.path.exists(os.path.join(args.run_dir, "config.yaml")):
        return _fail(f"{args.run_dir} holds no config.yaml: --run must be a run directory (runs/<run.name>)")
    ckpt_root = os.path.join(args.run_dir, CHECKPOINTS_DIR)
    ckpt = step_dir(ckpt_root, args.step - 1)
    if not os.path.isdir(ckpt):
        have = [step for step, _ in list_checkpoints(ckpt_root)]
        return _fail(f"no checkpoint of step {args.step - 1} (the weights step {args.step} started from) in "
                     f"{ckpt_root}; it holds steps {have}. Train with checkpoint.every=1 (and checkpoint.keep_last "
                     "large enough) around the steps to replay")
    # the settings the run trained with: the checkpoint's own copy (the run dir's may belong to a later start)
    config_path = os.path.join(ckpt, RUN_CONFIG)
    if not os.path.exists(config_path):
        config_path = os.path.join(args.run_dir, "config.yaml")
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        return _fail(f"{config_path}: {e}")
    batch_path = step_file(os.path.join(args.run_dir, ROLLOUTS_DIR), args.step)
    try:
        batch = load_step_batch(batch_path)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    logged = [r for r in read_jsonl(os.path.join(args.run_dir, "metrics.jsonl")) if r.get("step") == args.step]
    if not logged or "train/loss" not in logged[-1]:
        return _fail(f"metrics.jsonl of {args.run_dir} has no train/* metrics for step {args.step}")
    logged = logged[-1]
    with open(os.path.join(ckpt, TRAINER_STATE), encoding="utf-8") as f:
        state = json.load(f)

    print(f"[replay] step {args.step}: {len(batch)} samples from {batch_path}; actor from {ckpt} "
          f"({cfg.actor.layout.describe(cfg.resources.actor_ranks)})", flush=True)
    metrics = _replay(cfg, ckpt, state, batch)
    worst = 0.0
    print(f"{'metric':<24} {'logged':>22} {'replayed':>22}")
    for key in sorted(k for k in metrics if k.startswith("train/") and isinstance(logged.get(k), (int, float))):
        if key.endswith(("seconds", "per_second")):
            continue
        a, b = float(logged[key]), float(metrics[key])
        print(f"{key:<24} {a:>22.15g} {b:>22.15g}")
        if key in COMPARED:
            worst = max(worst, abs(a - b) / max(abs(a), 1e-30))
    ok = worst <= args.tolerance
    print(f"[replay] {'REPRODUCED' if ok else 'DIFFERS'}: largest relative difference of {', '.join(COMPARED)} = "
          f"{worst:.3g} (tolerance {args.tolerance:g})")
    return 0 if ok else 1


def _replay(cfg, ckpt: str, state: dict, batch) -> dict:
    """The update of `batch` by an actor restored from `ckpt`, on a private local Ray cluster."""
    import ray

    from megatron_rl.cluster.ray_cluster import start_local_ray_cluster
    from megatron_rl.config import required_cpus
    from megatron_rl.training.trainer import start_actor_group
    from megatron_rl.training.update import policy_update

    start_local_ray_cluster(num_cpus=cfg.resources.num_cpus or max(required_cpus(cfg), os.cpu_count() or 1))
    group = None
    try:
        group = start_actor_group(cfg)
        group.load_checkpoint(ckpt, state["actor"])
        return policy_update(group, batch, cfg)
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()
