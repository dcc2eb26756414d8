"""`megatron-rl train`: run RL training from a YAML config plus dotted overrides (no config: the CPU quickstart)."""
from __future__ import annotations

import argparse
import os
import sys

EPILOG = """\
examples:
  megatron-rl train                                        # the embedded CPU quickstart (tiny Qwen3, LUSPO+LSPO)
  megatron-rl train --config examples/configs/qwen2.5_7b_luspo.yaml actor.layout.tp=4 run.steps=500
  megatron-rl train --config my.yaml --resume              # continue from the latest checkpoint of run.name
  megatron-rl train --print-config run.steps=3             # show the resolved config and exit

Overrides are dotted keys into the config tree (see megatron_rl/config.py for every section); values are YAML:
  algorithm.lspo.enabled=false  actor.loss.name=gspo  sampling.max_tokens=512  data.train.path=[a.parquet,b.parquet]
Exit status: 0 done, 2 bad configuration or data (reported before Ray or any engine starts), 1 a failure during
training."""


def default_config_path() -> str:
    from importlib import resources

    return str(resources.files("megatron_rl") / "configs" / "quickstart_cpu.yaml")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="RL training (default: the CPU quickstart)",
        description="Train with the RL loop: rollouts on a vLLM pool, rewards, dynamic sampling + LSPO, the "
                    "configured policy loss (LUSPO by default) on Megatron actors, weight sync, evaluation, "
                    "checkpoints. Without --config it runs the embedded CPU quickstart.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config file (default: the CPU quickstart)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint of the run directory; start fresh when it has "
                        "none (so a requeued job can always pass it)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue although settings that change the math differ from the checkpoint's "
                        "(they are listed either way)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(run=run)


def load(args):
    from megatron_rl.config import ConfigError, load_config

    path = args.config or default_config_path()
    try:
        return load_config(path, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None


def run(args) -> int:
    import logging

    from megatron_rl.config import config_yaml

    cfg = load(args)
    if cfg is None:
        return 2
    if args.print_config:
        print(config_yaml(cfg))
        return 0
    logging.basicConfig(level=os.environ.get("MEGATRON_RL_LOG_LEVEL", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    from megatron_rl.training.trainer import Trainer

    print(f"[train] run dir: {cfg.run_dir}  (resolved config: {os.path.join(cfg.run_dir, 'config.yaml')})", flush=True)
    from megatron_rl.actor.ray_group import RankFailure
    from megatron_rl.config import ConfigError
    from megatron_rl.data import DataError

    try:
        final = Trainer(cfg, resume=args.resume, allow_config_change=args.allow_config_change).run()
    except ConfigError as e:  # found before Ray or any engine starts (e.g. a resume with a changed setting)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # found while reading the prompts, before Ray or any engine starts
        print(f"data error: {e}", file=sys.stderr)
        return 2
    except RankFailure as e:  # a Megatron rank died, raised or stalled: the run was torn down
        print(f"error: {e}\nThe run was stopped and every process it started was shut down; its last complete "
              f"checkpoint is intact: fix the cause and resume with --resume.", file=sys.stderr)
        return 1
    keys = ("eval/accuracy", "rollout/accuracy", "rollout/response_length_mean")
    print("[train] done: " + ", ".join(f"{k} {final[k]:.3f}" for k in keys if k in final), flush=True)
    return 0
