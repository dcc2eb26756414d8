"""Training checkpoints: one atomic directory per saved step, holding everything a resume needs.

    <run dir>/checkpoints/step_000012/
        megatron_rl.json, model/, hf_config/     the model (megatron_rl/checkpoint format; convert_to_hf reads it)
        optimizer/                               Megatron optimizer state (distributed checkpoint, reshardable)
        reference/                               the KL reference once reset to the policy (a model checkpoint)
        trainer_state.json                       step, data-sampler position, LR scheduler, weight version
        rng.pt                                   the driver's RNG states
        metrics.jsonl                            the metrics history up to this step
        pending_rollouts.json                    (asynchronous runs) generated, not yet trained batches

The directory is written as `step_000012.tmp-<time>-<pid>` and renamed when complete (every reader ignores
`.tmp-` directories), so a crash at any moment never leaves a checkpoint that looks complete; the last
`keep_last` complete checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import torch

from megatron_rl.checkpoint.model_ckpt import atomic_checkpoint_dir
from megatron_rl.checkpoint.names import (
    METRICS_FILE,
    RNG_FILE,
    STEP_DIR_FORMAT,
    STEP_DIR_PATTERN,
    TMP_MARKER,
    TRAINER_STATE,
)


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, STEP_DIR_FORMAT.format(step=step))


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = STEP_DIR_PATTERN.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, TRAINER_STATE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str) -> tuple[int, str] | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def remove_unfinished(root: str) -> list[str]:
    """Delete the `.tmp-` directories a crash left behind; returns their names."""
    if not os.path.isdir(root):
        return []
    removed = [n for n in os.listdir(root) if TMP_MARKER in n]
    for name in removed:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return removed


def save_training_checkpoint(root: str, step: int, actor_group, state: dict, *, metrics_path: str | None,
                             keep_last: int, extra_files: dict[str, str | bytes] | None = None) -> str:
    """Write step `step` atomically (all actor ranks write model + optimizer), then prune old checkpoints.
    extra_files: name (from names.py) -> text or bytes, e.g. an asynchronous run's generated, not yet trained
    rollouts."""
    final = step_dir(root, step)
    with atomic_checkpoint_dir(final, overwrite=True, collective=False) as tmp:
        for name, content in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
        actor_state = actor_group.save_checkpoint(tmp)
        with open(os.path.join(tmp, TRAINER_STATE), "w", encoding="utf-8") as f:
            json.dump({**state, "step": step, "actor": actor_state}, f, indent=2)
        torch.save({"python": random.getstate(), "torch": torch.get_rng_state()}, os.path.join(tmp, RNG_FILE))
        if metrics_path and os.path.exists(metrics_path):
            shutil.copyfile(metrics_path, os.path.join(tmp, METRICS_FILE))
    for _, old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: str) -> dict:
    with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as f:
        state = json.load(f)
    rng = torch.load(os.path.join(path, RNG_FILE), weights_only=True)
    python_state = rng["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    torch.set_rng_state(rng["torch"])
    return state


def restore_metrics(path: str, metrics_path: str) -> None:
    """Put the checkpoint's metrics history back (drops lines of steps after the checkpoint)."""
    saved = os.path.join(path, METRICS_FILE)
    if os.path.exists(saved):
        shutil.copyfile(saved, metrics_path + ".tmp")
        os.replace(metrics_path + ".tmp", metrics_path)
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)
