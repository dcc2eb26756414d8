"""End-to-end RL step time, broken down into rollout / reward / train / sync / other, from a real training run.

    rows = step_rows(workdir, steps=10)                  # runs `megatron-rl train` (the CPU quickstart) + reads it
    rows = step_breakdown("runs/x/metrics.jsonl", skip=2)  # or the breakdown of any finished run

The trainer times each part of `_rl_step` (`megatron_rl.training.timing.StepTimer`) and logs time/rollout,
time/reward, time/train, time/sync, time/other and time/step per step to metrics.jsonl; "train" contains the
old-log-prob (and reference log-prob) recompute and every mini-batch's `train_step`, whose own step time
(train/step_seconds) and forward+backward time (train/fwd_bwd_seconds) the trainer sums over the mini-batches
(`megatron_rl.training.trainer._combine_mini_batches`). Evaluation runs between steps and is not part of time/step. The
first `skip` steps are left out (allocator and engine warm-up).
"""
from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
from typing import Any, Sequence

PARTS = ("rollout", "reward", "train", "sync", "other")
# Overrides for a benchmark run: no checkpoints, no evaluation, no progress bars, no TensorBoard.
QUIET_OVERRIDES = (
    "checkpoint.every=0", "checkpoint.at_exit=false", "eval.every=0", "eval.at_start=false",
    "logging.progress_bars=false", "logging.tensorboard=false",
)


def step_breakdown(metrics_path: str, skip: int = 1) -> list[dict[str, Any]]:
    """Mean seconds per step of each part and its share of the step, over the RL steps after the first `skip`
    (rows: part, mean_s, share; the actor's own timings of the train part follow, indented). Steps that made no
    update (every group filtered out) count with zero train/sync time, and the total row says how many there were;
    ValueError when no measured step made an update."""
    from megatron_rl.training.metrics_logger import read_jsonl

    records = [r for r in read_jsonl(metrics_path) if "time/step" in r]
    if len(records) <= skip:
        raise ValueError(f"{metrics_path} has {len(records)} RL steps with timings; need more than skip={skip}")
    records = records[skip:]
    idle = sum("time/train" not in r for r in records)  # the trainer skips the update when no group was kept
    if idle == len(records):
        raise ValueError(f"none of the {len(records)} measured steps of {metrics_path} made an update (every group "
                         "was filtered out): the breakdown would show no train or sync time; use a config whose "
                         "steps train (e.g. a longer warmup.steps, or algorithm.dynamic_sampling.on_cap=top_up)")
    total = statistics.mean(r["time/step"] for r in records)
    rows = []
    for part in PARTS:
        seconds = statistics.mean(r.get(f"time/{part}", 0.0) for r in records)
        rows.append({"part": part, "mean_s": round(seconds, 4), "share": round(seconds / total, 3)})
    label = "step (total)" if not idle else f"step (total; {idle} of {len(records)} steps made no update)"
    rows.append({"part": label, "mean_s": round(total, 4), "share": 1.0})
    train_total = rows[PARTS.index("train")]["mean_s"]
    actor_step = _mean_of(records, "train/step_seconds")
    for seconds, label in ((actor_step, "  train: actor train_step (all mini-batches)"),
                           (_mean_of(records, "train/fwd_bwd_seconds"), "  train: of which forward+backward"),
                           (None if actor_step is None else train_total - actor_step,
                            "  train: the rest (old/reference log-prob recompute, Ray calls)")):
        if seconds is not None:
            rows.append({"part": label, "mean_s": round(seconds, 4), "share": round(seconds / total, 3)})
    return rows


def _mean_of(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
    return statistics.mean(values) if values else None


def run_training(run_dir: str, *, steps: int, config: str | None = None, overrides: Sequence[str] = (),
                 timeout_s: float = 3600) -> str:
    """Run `megatron-rl train` (default config: the CPU quickstart) for `steps` RL steps into `run_dir` (a fresh
    folder); returns the path of its metrics.jsonl. Raises with the tail of the log when training fails."""
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        raise FileExistsError(f"{run_dir} already holds a run; give the step benchmark a fresh --workdir")
    output_dir, name = os.path.split(os.path.abspath(run_dir))
    cmd = [sys.executable, "-m", "megatron_rl.cli", "train"] + (["--config", config] if config else []) + [
        f"run.output_dir={output_dir}", f"run.name={name}", f"run.steps={steps}", *QUIET_OVERRIDES, *overrides,
    ]
    os.makedirs(output_dir, exist_ok=True)
    log_path = os.path.join(output_dir, f"{name}.log")
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8") as f:
            tail = "".join(f.readlines()[-30:])
        raise RuntimeError(f"training for the step benchmark failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return os.path.join(run_dir, "metrics.jsonl")


def variant_rows(workdir: str, variants: Sequence[tuple[str, Sequence[str]]], *, steps: int = 10, skip: int = 2,
                 config: str | None = None, overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Train each (label, overrides) variant of `config` for `steps` steps, one after the other in this invocation;
    per variant the mean seconds per step and per part and the speed-up against the first variant."""
    rows = []
    for index, (label, extra) in enumerate(variants):
        path = run_training(os.path.join(workdir, f"variant_{index}"), steps=steps, config=config,
                            overrides=(*overrides, *extra))
        records = [r for r in _read(path) if "time/step" in r][skip:]
        row = {"variant": label, "overrides": " ".join(extra) or "-",
               "step_s": round(statistics.mean(r["time/step"] for r in records), 4)}
        for part in ("rollout", "train", "sync", "wait_rollouts"):
            row[f"{part}_s"] = round(statistics.mean(r.get(f"time/{part}", 0.0) for r in records), 4)
        row["staleness_max"] = max(r.get("async/staleness_max", 0.0) for r in records)
        rows.append(row)
    for row in rows:
        row["speedup_vs_first"] = round(rows[0]["step_s"] / row["step_s"], 2)
    return rows


def _read(path: str) -> list[dict]:
    from megatron_rl.training.metrics_logger import read_jsonl

    return read_jsonl(path)


def step_rows(workdir: str, *, steps: int = 10, skip: int = 2, config: str | None = None,
              overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Train `steps` steps of `config` (default: the CPU quickstart) in workdir/step_run and break them down."""
    path = run_training(os.path.join(workdir, "step_run"), steps=steps, config=config, overrides=overrides)
    return step_breakdown(path, skip=skip)
