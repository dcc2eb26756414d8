"""Asynchronous RL end to end (algorithm.max_staleness=1): real megatron-core actor, real vLLM engine, Ray, rewards.

- The staleness bound holds whatever is slow: the same run with the actor slowed down (every RL train step +1 s;
  the warm-up's are not) and with the engine slowed down (every generate call +1 s), injected through
  megatron_rl/faults.py (MEGATRON_RL_FAULTS), not through sleeps in the code. Step t trains on samples exactly
  min(t - 1, 1) weight versions old, the trainer waits for rollouts when the engine is slow and hardly at all when
  the actor is, and, because the schedule is fixed, both runs produce the same samples, rewards, losses and
  gradients (the schedule decides which weights generate what, never the timing).
- kill -9 of the whole run mid-step (the producer thread is then generating the next batch) and --resume: the
  generated, not yet trained batch comes back from the checkpoint and the run replays the uninterrupted one
  (tolerance as in test_train_e2e: 1e-5 relative, same computation on one machine).
"""
import json
import os
import shutil

import pytest

from tests.integration.train_runs import (
    assert_same_math,
    kill_when,
    read_metrics,
    run_train,
    start_train,
    write_config,
)

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

STEPS = 4
WARMUP = 20  # supervised steps, each a train_step call too
ASYNC = {"run.steps": STEPS, "algorithm.max_staleness": 1, "eval.every": 0, "eval.at_start": False,
         "warmup.steps": WARMUP}


def _slowed(point, seconds=1.0, calls=None):
    """The environment of a run whose `point` sleeps `seconds` at each of `calls` (1-based; None: every call)."""
    calls = [None] if calls is None else calls
    faults = [{"point": point, "action": "delay", "seconds": seconds, "call": call} for call in calls]
    return {**os.environ, "MEGATRON_RL_FAULTS": json.dumps(faults)}


@pytest.fixture(scope="module")
def slow_actor_output(tmp_path_factory):
    """The async run with the actor slowed down: its output directory (run "t", checkpointed every step)."""
    tmp = tmp_path_factory.mktemp("slow_actor")
    slowed = _slowed("actor.train_step", calls=range(WARMUP + 1, WARMUP + STEPS + 1))  # the RL steps, not the warm-up
    result = run_train(write_config(tmp, **ASYNC), f"run.output_dir={tmp / 'runs'}", env=slowed)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / "runs"


@pytest.fixture(scope="module")
def slow_actor_run(slow_actor_output):
    records = read_metrics(slow_actor_output / "t")
    assert all(r["time/train"] >= 1.0 for r in records)  # the delay was injected into every train step
    return records


def test_staleness_bound_holds_under_a_slow_actor_and_a_slow_engine(tmp_path, slow_actor_run):
    result = run_train(write_config(tmp_path, **ASYNC), f"run.output_dir={tmp_path / 'runs'}",
                       env=_slowed("engine.generate"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    slow_engine_run = read_metrics(tmp_path / "runs" / "t")
    assert all(r["time/rollout"] >= 1.0 for r in slow_engine_run)  # the delay was injected into every generate call
    for run in (slow_actor_run, slow_engine_run):
        assert [r["async/staleness_max"] for r in run] == [0.0, 1.0, 1.0, 1.0]  # min(t - 1, k)
        assert [r["async/staleness_mean"] for r in run] == [0.0, 1.0, 1.0, 1.0]
        assert all("train/loss" in r and "mismatch/mean_abs_diff" in r for r in run)
    # the trainer waits for the slow engine, not for itself: compare the waits over steps 2..4 (step 1 waits for the
    # first batch either way)
    waited = {name: sum(r["time/wait_rollouts"] for r in run[1:])
              for name, run in (("slow actor", slow_actor_run), ("slow engine", slow_engine_run))}
    assert waited["slow engine"] > waited["slow actor"] + 1.0, waited
    assert_same_math(slow_actor_run, slow_engine_run)


def test_kill_mid_step_then_resume_replays_the_async_run(tmp_path, slow_actor_run):
    config = write_config(tmp_path, **ASYNC, **{"checkpoint.every": 1})
    out = tmp_path / "killed"
    ckpt_root = out / "t" / "checkpoints"
    names = lambda: sorted(os.listdir(ckpt_root)) if ckpt_root.is_dir() else []  # noqa: E731
    # kill -9 right after step 2's checkpoint: step 3 trains while the producer generates batch 4
    kill_when(start_train(config, out, tmp_path / "run1.log", resume=False), lambda: "step_000002" in names(), "step 3")
    saved = json.loads((ckpt_root / "step_000002" / "pending_rollouts.json").read_text())
    assert [r["step"] for r in saved] == [3]  # batch 3 was generated (with step 1's weights), not yet trained
    log = tmp_path / "resume.log"
    resumed = start_train(config, out, log, resume=True)
    try:
        assert resumed.wait(timeout=900) == 0, log.read_text()[-3000:]
    finally:
        if resumed.poll() is None:
            resumed.kill()
    assert "[resume] continuing from step 2 (" in log.read_text()
    assert "with 1 generated, not yet trained batch(es)" in log.read_text()
    got = read_metrics(out / "t")
    assert [r["async/staleness_max"] for r in got] == [0.0, 1.0, 1.0, 1.0]
    assert_same_math(slow_actor_run, got)


def test_resume_with_another_max_staleness_is_refused(tmp_path, slow_actor_output):
    out = tmp_path / "runs"
    shutil.copytree(slow_actor_output, out)  # a copy of the async run above (max_staleness 1), checkpoints included
    again = run_train(write_config(tmp_path, **{**ASYNC, "run.steps": STEPS + 1, "algorithm.max_staleness": 0}),
                      f"run.output_dir={out}", "--resume")
    assert again.returncode == 2
    assert "config error: --resume: settings that change what the run computes differ" in again.stderr
    assert "algorithm.max_staleness: 1 -> 0" in again.stderr
