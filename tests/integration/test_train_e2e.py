"""The RL loop end to end on CPU: real megatron-core actor, real vLLM engine, Ray, rewards, checkpoints.

- a 3-step run produces metrics, evaluations, checkpoints and the resolved config;
- kill -9 of the whole run (driver, Ray, engine, actor) while a checkpoint is being written, --resume, kill -9
  again in the middle of the next step, --resume again: the same step sequence as an uninterrupted run, same
  prompts, same metrics (tolerance 1e-5 relative: identical weights, optimizer state, sampler position and
  per-request sampling seeds make the runs replay the same computation; only float summation order could differ,
  and it does not on one machine), and no checkpoint ever looks complete before it is;
- bad configs fail in seconds with the key named;
- SIGTERM finishes the step, saves and exits (that run also exercises the KL reference model).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.train_runs import (
    assert_same_math,
    kill_when,
    read_metrics,
    run_train,
    start_train,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def test_three_step_run(tmp_path):
    out = tmp_path / "runs"
    config_path = write_config(tmp_path, **{"algorithm.mini_batches": 2})  # 4 groups -> 2 optimizer steps of 2
    result = run_train(config_path, f"run.output_dir={out}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = out / "t"
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3]  # step 0 = evaluation before training
    for r in records[1:]:
        for key in ("rollout/reward_mean", "rollout/response_length_mean", "sampling/prompts_generated",
                    "time/rollout", "time/reward", "time/train", "time/sync", "time/other", "reward/num_timeouts"):
            assert key in r, key
        for key in ("rollout/accuracy", "rollout/response_length_p10", "rollout/response_length_p50",
                    "rollout/response_length_p90", "sampling/kept_accuracy", "sampling/dropped_accuracy",
                    "sampling/kept_lspo", "sampling/dropped_lspo", "sampling/final_groups"):
            assert key in r, key
        assert r["sampling/final_groups"] == 4  # every step trains a full batch (top-up as a last resort)
    trained = [r for r in records[1:] if "train/loss" in r]
    assert trained, "no step trained (every batch was filtered empty)"
    for key in ("train/grad_norm", "train/seq_clip_frac_low", "train/seq_clip_frac_high", "train/entropy",
                "train/approx_kl", "mismatch/mean_abs_diff"):
        assert key in trained[0], key
    assert all(r["train/optimizer_steps"] == 2 for r in trained)  # algorithm.mini_batches=2, whole groups each
    # rollout (vLLM) and training (Megatron) log-probs agree on the same weights: fp32 here
    assert all(r["mismatch/mean_abs_diff"] < 1e-4 for r in trained)
    assert "eval/accuracy" in records[0] and "eval/accuracy" in records[2]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_000001", "step_000002", "step_000003"]
    assert (run_dir / "config.yaml").exists() and (run_dir / "tensorboard").is_dir()
    assert "step 3/3" in result.stdout

    # `megatron-rl eval` on the final checkpoint (converted to HF, served by a fresh vLLM pool) reproduces the
    # in-training greedy evaluation of the same weights on the same prompts
    evaluated = subprocess.run([sys.executable, "-m", "megatron_rl.cli", "eval", "--config", config_path,
                                f"run.output_dir={out}"], capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    metrics = json.loads((run_dir / "eval" / "eval_metrics.json").read_text())
    assert metrics["eval/avg@1"] == pytest.approx(records[3]["eval/accuracy"])
    assert metrics["eval/mean_response_length"] == pytest.approx(records[3]["eval/mean_response_length"])


def test_kill_at_any_time_then_resume_replays_exactly(tmp_path, reference_run):
    config, steps = reference_run.config, len(reference_run.records)  # the small config: 4 steps, no evaluation
    out = tmp_path / "killed"
    ckpt_root = out / "t" / "checkpoints"
    names = lambda: sorted(os.listdir(ckpt_root)) if ckpt_root.is_dir() else []

    # kill 1, while step 2's checkpoint is being written: its .tmp- directory exists, step_000002 does not yet
    kill_when(start_train(config, out, tmp_path / "run1.log", resume=False),
              lambda: any(n.startswith("step_000002.tmp-") for n in names()), "the checkpoint of step 2")
    assert "step_000001" in names() and "step_000002" not in names(), names()  # the half-written one never looks done
    assert any(".tmp-" in n for n in names())

    # kill 2, in the middle of step 3: step 2 is saved (a step starts right after its predecessor's save)
    log2 = tmp_path / "resume2.log"
    kill_when(start_train(config, out, log2, resume=True), lambda: "step_000002" in names(), "step 3")
    assert "[resume] continuing from step 1" in log2.read_text()
    assert "step_000003" not in names() and [r["step"] for r in read_metrics(out / "t")][-1] == 2  # step 3 unfinished

    log3 = tmp_path / "resume3.log"
    resumed = start_train(config, out, log3, resume=True)
    try:
        assert resumed.wait(timeout=900) == 0, log3.read_text()[-3000:]
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
    assert "[resume] continuing from step 2" in log3.read_text()
    assert not any(".tmp-" in n for n in names())

    got = read_metrics(out / "t")
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert_same_math(reference_run.records, got, ignore=("time/", "sync/"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("actor.layuot.tp=2", "actor.layuot: unknown key (did you mean 'actor.layout'?)"),
        ("run.steps=many", "run.steps: must be an integer"),
        ("actor.layout.tp=2", "actor.layout.tp=2 does not divide num_key_value_heads (query groups)=1"),
        ("resources.num_cpus=1", "resources.num_cpus=1 is less than the actors and engines need"),
        ("algorithm.lspo.low_quantile=1.5", "algorithm.lspo.low_quantile: must be a number in (0, 1]"),
    ],
)
def test_bad_config_fails_fast(tmp_path, override, message):
    start = time.monotonic()
    result = run_train(write_config(tmp_path), f"run.output_dir={tmp_path}", override, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert time.monotonic() - start < 30  # seconds, not the minutes a launch would take
    assert not (tmp_path / "t").exists()  # nothing was created


def test_sigterm_finishes_the_step_saves_and_exits(tmp_path):
    # also the KL path: without a warm-up the reference model (loaded from model.path) equals the initial policy,
    # so step 1's KL to it must be ~0 (k3 of identical forwards; a wrong reference gives O(0.1) nats)
    config = write_config(tmp_path, **{"run.steps": 1000, "checkpoint.every": 0, "eval.every": 0,
                                       "eval.at_start": False, "warmup.steps": 0, "actor.loss.kl_coef": 0.01})
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_rl.cli", "train", "--config", config,
                             f"run.output_dir={out}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        metrics = out / "t" / "metrics.jsonl"
        assert wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 600, proc)
        proc.send_signal(signal.SIGTERM)  # what `scancel` / a time limit sends
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]
    assert "[stop] SIGTERM: finishing the current step, then saving" in output
    records = read_metrics(out / "t")
    assert records[0]["step"] == 1 and abs(records[0]["train/kl"]) < 1e-6
    last = records[-1]["step"]
    assert 1 <= last < 1000
    assert sorted(os.listdir(out / "t" / "checkpoints")) == [f"step_{last:06d}"]
