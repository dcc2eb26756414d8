"""What the end-to-end tests share: the small CPU config, launching `megatron-rl train` (to completion, or in its
own session to be killed at a chosen moment), reading a run's metrics and comparing two runs' numbers.

The session-scoped run that several tests compare against (`reference_run`) lives in tests/integration/conftest.py.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from megatron_rl.training.metrics_logger import read_jsonl

SMALL = {
    "run": {"name": "t", "steps": 3, "seed": 3},
    "model": {"tiny_arch": "qwen3", "tiny": {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 2,
                                             "num_kv_heads": 1, "head_dim": 32, "intermediate_size": 128}},
    "data": {"synthetic": {"task": "arithmetic", "difficulty": 1, "num_train": 200, "num_val": 8}},
    "warmup": {"steps": 40, "batch_size": 16, "lr": 0.003},
    # top-up with zero-advantage groups as a last resort: every step trains, syncs and checkpoints something
    "algorithm": {"prompts_per_step": 4,
                  "dynamic_sampling": {"max_rounds": 2, "on_cap": "top_up", "top_up_with_zero_advantage": True}},
    "actor": {"optimizer": {"lr": 5.0e-4}, "max_tokens_per_microbatch": 512},
    "sampling": {"n": 4, "temperature": 1.0, "max_tokens": 8},
    "rollout": {"engine": {"dtype": "float32", "max_model_len": 128}},
    "eval": {"every": 2, "n": 1},
    "checkpoint": {"every": 1, "keep_last": 5},
    "logging": {"tensorboard": True, "progress_bars": False},
}


def write_config(tmp_path, **changes) -> str:
    cfg = json.loads(json.dumps(SMALL))
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_train(config, *args, timeout=900, **popen):
    return subprocess.run([sys.executable, "-m", "megatron_rl.cli", "train", "--config", config, *args],
                          capture_output=True, text=True, timeout=timeout, **popen)


def read_metrics(run_dir):
    """A run's metrics.jsonl, one dict per logged step (read as the trainer's own resume reads it)."""
    return read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


# Metrics that measure wall time (they differ between runs by nature): these prefixes, and names with these endings.
WALL_CLOCK = ("time/", "sync/seconds")
WALL_CLOCK_ENDINGS = ("_seconds", "_s", "tokens_per_second")


def is_wall_clock(key: str, prefixes: tuple[str, ...] = WALL_CLOCK) -> bool:
    return key.startswith(prefixes) or key.endswith(WALL_CLOCK_ENDINGS)


def assert_same_math(ref: list[dict], got: list[dict], ignore: tuple[str, ...] = WALL_CLOCK) -> None:
    """Two runs' metrics records: the same steps, the same prompts in order, and every non-timing float equal to
    1e-5 relative (`ignore`: the prefixes of the keys not compared, besides the WALL_CLOCK_ENDINGS)."""
    assert [r["step"] for r in ref] == [r["step"] for r in got]
    for a, b in zip(ref, got):
        assert a["sampling/prompt_rows"] == b["sampling/prompt_rows"], a["step"]  # the same prompts, in order
        for key, value in a.items():
            if is_wall_clock(key, ignore):
                continue
            if isinstance(value, float) and not math.isnan(value):
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (a["step"], key)


def wait_for(predicate, timeout, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def start_train(config, out, log, *, resume, overrides=()):
    """The training command in its own session (so kill -9 of the group takes Ray, engine and actors too)."""
    with log.open("w") as output:
        return subprocess.Popen([sys.executable, "-m", "megatron_rl.cli", "train", "--config", config,
                                 f"run.output_dir={out}", *overrides, *(["--resume"] if resume else [])],
                                stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(proc, predicate, what):
    try:
        assert wait_for(predicate, 600, proc), f"the run never reached {what}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
