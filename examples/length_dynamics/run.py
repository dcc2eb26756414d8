#!/usr/bin/env python
"""Length dynamics in miniature: GRPO, GSPO, LUSPO and LUSPO+LSPO on the same task and tiny model, several seeds.

    python examples/length_dynamics/run.py                        # everything: configs, 21 runs, plots, summary
    python examples/length_dynamics/run.py --seeds 0 --steps 20   # a quick look
    python examples/length_dynamics/run.py --plots-only           # redraw from the runs already there

Writes
    <runs>/configs/<method>.yaml      the full config of each method (base.yaml + the method's overrides); any run
                                      can be repeated alone: megatron-rl train --config <that file> run.seed=1
    <runs>/<method>_s<seed>/          each run (metrics.jsonl, resolved config.yaml, train.log)
    <out>/length.png, accuracy.png, sample_efficiency.png, diagnostics.png, ablation.png
                                      the curves (mean over seeds + min-max band)
    <out>/summary.md, summary.json    the numbers of README.md: mean ± spread (min..max) over seeds
<runs> defaults to runs/length_dynamics (git-ignored), <out> to this folder. Runs whose metrics.jsonl already
reaches the last step are reused (delete them to redo); the others are (re)run from scratch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

# method -> dotted overrides on top of base.yaml (everything else is shared)
METHODS = {
    "grpo": ["actor.loss.name=grpo"],            # token ratios, clip 0.2, seq-mean-token-mean
    "gspo": ["actor.loss.name=gspo"],            # sequence ratio, clip 3e-4 / 4e-4, mean over sequences
    "luspo": ["actor.loss.name=luspo"],          # GSPO x |y_i|, clip 2e-3 / 2.5e-3
    "luspo_lspo": ["actor.loss.name=luspo", "algorithm.lspo.enabled=true"],  # + length-aware sampling
    # Ablation: one optimizer step per rollout batch, so every ratio is exactly 1 and no clip range matters:
    # GSPO and LUSPO then differ ONLY in LUSPO's |y_i| weight (GSPO's tiny clip range cannot explain a difference).
    "gspo_onpolicy": ["actor.loss.name=gspo", "algorithm.mini_batches=1"],
    "luspo_onpolicy": ["actor.loss.name=luspo", "algorithm.mini_batches=1"],
    # Ablation: GSPO with LUSPO's clip range, 4 mini-batches: the loss differs from LUSPO only by the |y_i| weight.
    "gspo_wideclip": ["actor.loss.name=gspo", "actor.loss.clip_low=0.002", "actor.loss.clip_high=0.0025"],
}
LABELS = {"grpo": "GRPO", "gspo": "GSPO", "luspo": "LUSPO", "luspo_lspo": "LUSPO+LSPO",
          "gspo_onpolicy": "GSPO, 1 mini-batch", "luspo_onpolicy": "LUSPO, 1 mini-batch",
          "gspo_wideclip": "GSPO, LUSPO's clip"}
MAIN = ("grpo", "gspo", "luspo", "luspo_lspo")
# Paired comparisons (same seed = same initial model, data order and sampling seeds): A vs B.
PAIRS = (("luspo", "gspo"), ("luspo_onpolicy", "gspo_onpolicy"), ("luspo", "gspo_wideclip"), ("luspo_lspo", "luspo"),
         ("grpo", "luspo"))
PAIRED_KEYS = ("rollout_length_steps11_30", "rollout_length_last10", "eval_accuracy_end", "rollout_accuracy_last10",
               "responses_to_acc_0.6")
ABLATION = ("gspo", "luspo", "gspo_onpolicy", "luspo_onpolicy", "gspo_wideclip")
ACCURACY_THRESHOLD = 0.6  # sample efficiency: responses generated until the 10-step mean rollout accuracy reaches it
LENGTH_THRESHOLD = 20.0  # length dynamics: first step whose 10-step mean rollout response length reaches it


def write_method_configs(runs_dir: str, steps: int) -> dict[str, str]:
    from megatron_rl.config_loader import deep_merge, parse_overrides, read_yaml

    import yaml

    base = read_yaml(os.path.join(HERE, "base.yaml"))
    paths = {}
    os.makedirs(os.path.join(runs_dir, "configs"), exist_ok=True)
    for method, overrides in METHODS.items():
        raw = deep_merge(base, parse_overrides([*overrides, f"run.steps={steps}", f"run.output_dir={runs_dir}"]))
        path = os.path.join(runs_dir, "configs", f"{method}.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"# {LABELS[method]}: examples/length_dynamics/base.yaml + {overrides}\n")
            yaml.safe_dump(raw, f, sort_keys=False)
        paths[method] = path
    return paths


def completed(run_dir: str, steps: int) -> bool:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        return any(json.loads(line).get("step") == steps and "time/step" in line for line in f if line.strip())


def train(config: str, runs_dir: str, name: str, seed: int) -> float:
    run_dir = os.path.join(runs_dir, name)
    os.makedirs(run_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "megatron_rl.cli", "train", "--config", config, f"run.name={name}",
           f"run.seed={seed}", f"run.output_dir={runs_dir}"]
    start = time.time()
    with open(os.path.join(run_dir, "train.log"), "w", encoding="utf-8") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        raise SystemExit(f"run {name} failed (exit {code}); see {os.path.join(run_dir, 'train.log')}")
    return time.time() - start


# ------------------------------------------------------------------------------------------------------ summary
def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _first_reaching(xs: list[float], ys: list[float], threshold: float, window: int = 10) -> float | None:
    """x at the first point where the trailing `window`-point mean of ys reaches `threshold` (None: never)."""
    for i in range(window - 1, len(ys)):
        if statistics.mean(ys[i - window + 1: i + 1]) >= threshold:
            return xs[i]
    return None


def run_numbers(records: list[dict]) -> dict:
    """The numbers of one run: start/end accuracy and length, how fast the length grows, responses generated,
    sample efficiency."""
    from plot_metrics import series

    rl = [r for r in records if "time/step" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    acc_x, acc_y, _ = series(records, "rollout/accuracy", "sampling/responses_generated")
    len_x, len_y, _ = series(records, "rollout/response_length_mean")
    return {
        "eval_accuracy_start": evals[0]["eval/accuracy"] if evals else None,
        "eval_accuracy_end": evals[-1]["eval/accuracy"] if evals else None,
        "eval_length_end": evals[-1].get("eval/mean_response_length") if evals else None,
        "rollout_length_first5": _mean(r.get("rollout/response_length_mean") for r in rl[:5]),
        "rollout_length_steps11_30": _mean(r.get("rollout/response_length_mean") for r in rl[10:30]),
        "rollout_length_last10": _mean(r.get("rollout/response_length_mean") for r in rl[-10:]),
        f"step_length_{LENGTH_THRESHOLD:g}": _first_reaching(len_x, len_y, LENGTH_THRESHOLD),
        "rollout_accuracy_last10": _mean(r.get("rollout/accuracy") for r in rl[-10:]),
        "responses_generated": sum(r.get("sampling/responses_generated", 0) for r in rl),
        f"responses_to_acc_{ACCURACY_THRESHOLD}": _first_reaching(acc_x, acc_y, ACCURACY_THRESHOLD),
    }


def summarize(runs: dict[str, list[str]]) -> tuple[dict, str]:
    from plot_metrics import read_records

    per_method = {m: [run_numbers(read_records(p)) for p in paths] for m, paths in runs.items()}
    keys = list(next(iter(per_method.values()))[0])
    lines = ["| method | seeds | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    table = {}
    for method, numbers in per_method.items():
        cells, table[method] = [], {}
        for key in keys:
            values = [n[key] for n in numbers]
            present = [v for v in values if v is not None]
            table[method][key] = {"values": values}
            if not present:
                cells.append("-")
                continue
            mean = statistics.mean(present)
            table[method][key].update(mean=mean, min=min(present), max=max(present))
            fmt = ".0f" if "responses" in key or key.startswith("step_") else ".3g"
            missing = f" ({len(values) - len(present)} never)" if len(present) < len(values) else ""
            cells.append(f"{mean:{fmt}} ({min(present):{fmt}}..{max(present):{fmt}}){missing}")
        lines.append(f"| {LABELS.get(method, method)} | {len(numbers)} | " + " | ".join(cells) + " |")
    lines += ["", "Paired by seed (A - B per seed; in brackets: seeds where A > B / seeds compared):", "",
              "| A vs B | " + " | ".join(PAIRED_KEYS) + " |", "|---|" + "---|" * len(PAIRED_KEYS)]
    for a, b in PAIRS:
        if a not in per_method or b not in per_method:
            continue
        cells = []
        for key in PAIRED_KEYS:
            diffs = [x[key] - y[key] for x, y in zip(per_method[a], per_method[b])
                     if x[key] is not None and y[key] is not None]
            fmt = ".0f" if "responses" in key else ".3g"
            cells.append(", ".join(f"{d:+{fmt}}" for d in diffs) + f" [{sum(d > 0 for d in diffs)}/{len(diffs)}]")
        lines.append(f"| {LABELS[a]} vs {LABELS[b]} | " + " | ".join(cells) + " |")
    return table, "\n".join(lines)


def draw(runs: dict[str, list[str]], out_dir: str) -> list[str]:
    from plot_metrics import plot

    def labelled(methods):
        return [(LABELS.get(m, m), p) for m in methods if m in runs for p in runs[m]]

    n = len(next(iter(runs.values())))
    band = f"mean of {n} seed(s) with min-max band"
    figures = {
        "length.png": (MAIN, dict(
            keys=["rollout/response_length_mean", "eval/mean_response_length", "rollout/response_length_p10"],
            smooth_window=5, title=f"Response length (tokens), {band}; rollout curves smoothed over 5 steps")),
        "accuracy.png": (MAIN, dict(
            keys=["rollout/accuracy", "eval/accuracy"], smooth_window=5,
            title=f"Accuracy of sampled training responses (smoothed over 5 steps) and greedy validation (128 "
                  f"prompts), {band}")),
        "sample_efficiency.png": (MAIN, dict(
            keys=["rollout/accuracy", "eval/accuracy"], smooth_window=5, x_key="sampling/responses_generated",
            title="Accuracy against responses generated (dynamic sampling and LSPO generate extra rounds)")),
        "diagnostics.png": (MAIN, dict(
            keys=["batch/response_length_mean", "train/entropy", "train/grad_norm", "sampling/rounds_used",
                  "sampling/responses_generated", "mismatch/mean_abs_diff"], smooth_window=5,
            title="Diagnostics: length of the trained (filtered) batch, entropy and grad norm (train/*: mean over "
                  "the step's mini-batches), sampling rounds per step")),
        "ablation.png": (ABLATION, dict(
            keys=["rollout/response_length_mean", "rollout/accuracy", "eval/accuracy"], smooth_window=5,
            title=f"GSPO vs LUSPO: 4 mini-batches (clip ranges act), 1 mini-batch (ratios = 1, no clipping), and "
                  f"GSPO with LUSPO's clip range; {band}")),
    }
    written = []
    for name, (methods, kwargs) in figures.items():
        runs_here = labelled(methods)
        if not runs_here:
            continue
        path = os.path.join(out_dir, name)
        summary = plot(runs_here, path, **kwargs)
        for label, run, key in summary["missing"]:
            print(f"[plots] {label} {run}: {key} never logged", file=sys.stderr)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds (model init, data order, sampling)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {list(METHODS)}")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--runs-dir", default=os.path.join(REPO, "runs", "length_dynamics"))
    parser.add_argument("--out", default=HERE, help="where the PNGs and summary go")
    parser.add_argument("--plots-only", action="store_true", help="do not train; plot the runs already there")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not seeds or args.steps < 1:
        parser.error(f"unknown methods {unknown}" if unknown else "need at least one seed and --steps >= 1")
    runs_dir = os.path.abspath(args.runs_dir)
    configs = write_method_configs(runs_dir, args.steps)
    runs = {m: [os.path.join(runs_dir, f"{m}_s{s}") for s in seeds] for m in methods}
    if not args.plots_only:
        # seed-major order: an interrupted sweep still has every method at the first seeds
        for seed in seeds:
            for method in methods:
                name = f"{method}_s{seed}"
                if completed(os.path.join(runs_dir, name), args.steps):
                    print(f"[run] {name}: done already, reused", flush=True)
                    continue
                print(f"[run] {name} ...", flush=True)
                seconds = train(configs[method], runs_dir, name, seed)
                print(f"[run] {name}: {seconds / 60:.1f} min", flush=True)
    missing = [p for paths in runs.values() for p in paths if not completed(p, args.steps)]
    if missing:
        raise SystemExit(f"runs not complete (run without --plots-only): {missing}")
    os.makedirs(args.out, exist_ok=True)
    for path in draw(runs, args.out):
        print(f"[plots] {path}")
    table, markdown = summarize(runs)
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"seeds": seeds, "steps": args.steps, "methods": {m: METHODS[m] for m in methods},
                   "numbers": table}, f, indent=2)
    with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(f"Mean (min..max) over seeds {seeds}, {args.steps} RL steps; generated by run.py\n\n{markdown}\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
