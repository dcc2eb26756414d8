"""Per-step metrics to JSONL (one line per step, flushed) and TensorBoard, optionally wandb; console summary lines.

On resume the JSONL file is cut back to the checkpoint's step (lines of steps that are about to be redone are
dropped, atomically) and TensorBoard purges events after it, so a resumed run's logs read as if uninterrupted.
"""
from __future__ import annotations

import json
import math
import os


class MetricsLogger:
    def __init__(self, run_dir: str, *, jsonl: bool = True, tensorboard: bool = True, wandb_project: str | None = None,
                 run_name: str = "run", resume_step: int | None = None, config: dict | None = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._jsonl = None
        if jsonl:
            if resume_step is not None:
                truncate_jsonl(self.path, resume_step)
            elif os.path.exists(self.path):
                os.remove(self.path)
            self._jsonl = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge)
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed: pip install wandb") from None
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_jsonl(path: str, last_step: int) -> None:
    """Keep only records with step <= last_step (atomic rewrite; a torn last line is dropped too)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if record.get("step", math.inf) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _fmt(metrics: dict, key: str, spec: str = ".3g") -> str:
    value = metrics.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def summary_line(step: int, total: int, m: dict) -> str:
    """One line per step: the numbers a researcher watches."""
    parts = [
        f"step {step}/{total}",
        f"reward {_fmt(m, 'rollout/reward_mean')} acc {_fmt(m, 'rollout/accuracy')}",
        f"len {_fmt(m, 'rollout/response_length_mean', '.1f')}",
        f"groups {_fmt(m, 'sampling/final_groups', '.0f')}/{_fmt(m, 'sampling/prompts_generated', '.0f')}",
        f"loss {_fmt(m, 'train/loss')} gnorm {_fmt(m, 'train/grad_norm')}",
        f"clip {_fmt(m, 'train/seq_clip_frac_low', '.2f')}/{_fmt(m, 'train/seq_clip_frac_high', '.2f')}",
        f"mismatch {_fmt(m, 'mismatch/mean_abs_diff', '.1e')}",
    ]
    if "eval/accuracy" in m:
        parts.append(f"EVAL acc {_fmt(m, 'eval/accuracy')}")
    times = " ".join(f"{k.split('/')[1]} {m[k]:.1f}" for k in ("time/rollout", "time/reward", "time/train", "time/sync")
                     if k in m)
    parts.append(f"{_fmt(m, 'time/step', '.1f')}s ({times})")
    return " | ".join(parts)
