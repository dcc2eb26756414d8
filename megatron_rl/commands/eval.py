"""`megatron-rl eval`: avg@n / pass@k accuracy and response length of a model on a validation set, through the
same vLLM rollout pool and reward functions as training."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

EPILOG = """\
examples:
  megatron-rl eval                                           # the quickstart run's latest checkpoint on its val set
  megatron-rl eval --checkpoint runs/quickstart/checkpoints/step_000200 --n 8 --pass-k 1,8 --temperature 1.0
  megatron-rl eval --model /models/Qwen3-8B --config my.yaml data.val.path=/data/aime-2024.parquet

What is evaluated: --model (an HF folder), else --checkpoint (a megatron_rl checkpoint, converted to HF in a temp
folder first), else the latest checkpoint of the config's run, else the config's model.path. The data, reward function
and engine settings come from the config (data.val, reward, rollout); sampling from --n/--temperature/--max-tokens or
the config's eval section. Writes eval_metrics.json and eval_samples.jsonl to --output (default <run dir>/eval)."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a model or checkpoint (avg@n, pass@k, response length)",
        description="Evaluate a model on a validation set with the vLLM rollout pool and the configured reward.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config (default: the CPU quickstart)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="HF model folder to evaluate")
    source.add_argument("--checkpoint", help="megatron_rl checkpoint directory (step_XXXXXX) to evaluate")
    p.add_argument("--n", type=int, default=None, help="samples per prompt (default: eval.n)")
    p.add_argument("--pass-k", type=_int_list, default=None, metavar="K[,K...]",
                   help="k values for pass@k, comma-separated, each <= --n (default: eval.pass_ks)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: eval.temperature)")
    p.add_argument("--max-tokens", type=int, default=None, help="response length limit (default: eval.max_tokens)")
    p.add_argument("--output", default=None, help="folder for eval_metrics.json / eval_samples.jsonl")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(run=run)


def _int_list(text: str) -> list[int]:
    """"1,8" -> [1, 8] (one argument, so that the key=value overrides after it are not read as k values)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,8; got {text!r}") from None


def _model_source(args, cfg) -> tuple[str, str | None]:
    """(kind, path): kind is "hf" or "checkpoint"."""
    from megatron_rl.checkpoint.names import CHECKPOINTS_DIR
    from megatron_rl.checkpoint.run_state import latest_checkpoint

    if args.model:
        return "hf", args.model
    if args.checkpoint:
        return "checkpoint", args.checkpoint
    latest = latest_checkpoint(os.path.join(cfg.run_dir, CHECKPOINTS_DIR))
    if latest is not None:
        return "checkpoint", latest[1]
    return "hf", cfg.model.path


def _sampling(args, cfg):
    """(SamplingConfig, pass_ks) from the flags and the config's eval section; ValueError names the flag."""
    from megatron_rl.training.evaluation import check_pass_ks
    from megatron_rl.rollout.types import SamplingConfig

    ev = cfg.eval
    n = ev.n if args.n is None else args.n
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if args.pass_k is not None:
        try:
            pass_ks = check_pass_ks(args.pass_k, n)
        except ValueError as e:
            raise ValueError(f"--pass-k: {e}") from None
    else:
        pass_ks = [k for k in ev.pass_ks if k <= n] or [1]
        dropped = sorted(set(ev.pass_ks) - set(pass_ks))
        if dropped:
            print(f"[eval] eval.pass_ks {dropped} exceed --n {n}: not reported (raise --n to get them)", flush=True)
    try:
        sampling = SamplingConfig(n=n, temperature=ev.temperature if args.temperature is None else args.temperature,
                                  top_p=ev.top_p, max_tokens=args.max_tokens or ev.max_tokens or cfg.sampling.max_tokens,
                                  seed=cfg.run.seed)
    except ValueError as e:
        raise ValueError(f"--temperature / --max-tokens (or the config's eval section): {e}") from None
    return sampling, pass_ks


def run(args) -> int:
    from megatron_rl.commands.train import default_config_path
    from megatron_rl.config import ConfigError, load_config
    from megatron_rl.data.errors import DataError

    try:
        cfg = load_config(args.config or default_config_path(), args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg.data.val is None:
        print("config error: data.val: nothing to evaluate on; give data.val.path (or data.synthetic)", file=sys.stderr)
        return 2
    try:  # every flag is checked before a checkpoint is converted or an engine starts
        sampling, pass_ks = _sampling(args, cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kind, path = _model_source(args, cfg)
    if not path or not os.path.exists(path):
        print(f"error: no model to evaluate at {path!r} (train first, or pass --model/--checkpoint)", file=sys.stderr)
        return 2
    output = args.output or os.path.join(cfg.run_dir, "eval")
    with tempfile.TemporaryDirectory(prefix="megatron_rl_eval_") as tmp:
        hf_dir = path
        if kind == "checkpoint":
            from megatron_rl.checkpoint.convert import convert_to_hf

            print(f"[eval] converting {path} to HF in {tmp}", flush=True)
            hf_dir = os.path.join(tmp, "hf")
            convert_to_hf(path, hf_dir, progress=False)
        try:
            metrics = _evaluate(cfg, hf_dir, sampling, pass_ks, output,
                                source={"kind": kind, "path": os.path.abspath(path)})
        except DataError as e:
            print(f"data error: {e}", file=sys.stderr)
            return 2
    print(f"[eval] {kind} {path}")
    for key in sorted(metrics):
        print(f"  {key:40s} {metrics[key]:.4f}")
    print(f"[eval] wrote {os.path.join(output, 'eval_metrics.json')}")
    return 0


def _evaluate(cfg, hf_dir: str, sampling, pass_ks, output: str, source: dict) -> dict:
    """Read and tokenize the validation set first (a data error costs seconds), then start Ray and the engines."""
    from transformers import AutoTokenizer

    from megatron_rl.data import build_prompt_dataset
    from megatron_rl.training.evaluation import run_evaluation
    from megatron_rl.rollout.pool import RolloutPool
    from megatron_rl.cluster.ray_cluster import local_ray_cluster
    from megatron_rl.training.experience import generate_grouped

    data = cfg.data.val
    if cfg.data.synthetic is not None and not os.path.exists(data.path):
        from megatron_rl.data.synthetic.export import write_synthetic_dataset

        syn = cfg.data.synthetic
        write_synthetic_dataset(data.path, syn.task, syn.num_val, seed=syn.seed + 1, difficulty=syn.difficulty, split="val")
    if cfg.eval.num_prompts:
        data = dataclasses.replace(data, max_examples=cfg.eval.num_prompts)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    dataset = build_prompt_dataset(data, tokenizer, key="data.val")
    pool_config = dataclasses.replace(cfg.rollout, engine=dataclasses.replace(cfg.rollout.engine, model=hf_dir))
    needed = cfg.rollout.num_engines * cfg.rollout.engine.cpus_per_engine
    with local_ray_cluster(num_cpus=max(needed, os.cpu_count() or 1)):
        with RolloutPool(pool_config) as pool:
            result = run_evaluation(
                dataset, tokenizer, lambda ids, s: generate_grouped(pool, ids, s), sampling,
                reward_fn=cfg.reward.fn, reward_fn_kwargs=dict(cfg.reward.kwargs), reward_workers=cfg.reward.num_workers,
                reward_timeout_s=cfg.reward.timeout_s, pass_ks=pass_ks, output_dir=output,
            )
    with open(os.path.join(output, "eval_source.json"), "w", encoding="utf-8") as f:
        json.dump({**source, "sampling": dataclasses.asdict(sampling)}, f, indent=2)
    return result.metrics
