"""The launch script users submit (examples/luspo_30b_moe.sh) on a real single-node Slurm (tools/slurm_local.sh):
sbatch'ed with the CPU quickstart config and a few steps, it brings up its Ray cluster, trains, writes metrics and
checkpoints, and leaves no process behind, whether it finishes, is stopped cleanly (scancel --batch --signal=TERM:
the trainer checkpoints) or is cancelled hard (scancel).

The same script as on GPUs; only settings differ: `sbatch --nodes=1 --gpus-per-node=0`, GPUS_PER_NODE=0 (the
config's own CPU resources), RAY_LOOPBACK=1 (Ray on 127.0.0.1), a free RAY_PORT, a small object store.
Skipped when no Slurm answers here, failed instead when MEGATRON_RL_REQUIRE_SLURM=1 (CI starts Slurm first).
"""
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from megatron_rl.training.metrics_logger import read_jsonl

pytestmark = [pytest.mark.slurm, pytest.mark.ray, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "examples/luspo_30b_moe.sh"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}
# The CPU quickstart, made small: a short warm-up, 4 prompts x 8 samples per step, one generation round topped up
# with zero-advantage groups (so every step makes an optimizer step), no evaluation, a checkpoint every step.
OVERRIDES = ["warmup.steps=3", "eval.every=0", "eval.at_start=false", "algorithm.prompts_per_step=4",
             "algorithm.dynamic_sampling.max_rounds=1", "algorithm.dynamic_sampling.on_cap=top_up",
             "algorithm.dynamic_sampling.top_up_with_zero_advantage=true", "checkpoint.every=1",
             "logging.progress_bars=false", "rollout.engine.engine_kwargs={enable_chunked_prefill: false}"]


def _slurm_unavailable() -> str | None:
    if shutil.which("sbatch") is None:
        return "no Slurm here (sbatch not found); `bash tools/slurm_local.sh start` installs and starts a local one"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s; `bash tools/slurm_local.sh status`"
    if states.returncode != 0:
        return f"no Slurm controller answers (sinfo: {states.stderr.strip()}); `bash tools/slurm_local.sh start`"
    if not {"idle", "mixed"} & set(states.stdout.split()):
        return f"no Slurm node takes jobs (sinfo states: {states.stdout.split()}); `bash tools/slurm_local.sh status`"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm():
    reason = _slurm_unavailable()
    if reason:
        if os.environ.get("MEGATRON_RL_REQUIRE_SLURM") == "1":
            pytest.fail(f"MEGATRON_RL_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """One sbatch submission of the launch script; cancelled at the end of the test if it still runs."""

    def __init__(self, tmp_path: Path, *args: str, run_name: str = "t", **env):
        self.run_dir = tmp_path / "runs" / run_name
        job_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        job_env.update(CONFIG="megatron_rl/configs/quickstart_cpu.yaml", GPUS_PER_NODE="0", RAY_LOOPBACK="1",
                       RAY_PORT=str(_free_port()), RAY_OBJECT_STORE_BYTES=str(256 << 20), RAY_STOP_TIMEOUT="5",
                       OUTPUT_DIR=str(tmp_path / "runs"), RUN_NAME=run_name, **env)
        out = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0",
                              f"--output={tmp_path}/job-%j.out", SCRIPT, *OVERRIDES, *args],
                             cwd=REPO, env=job_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        self.id = out.stdout.strip().split(";")[0]
        self.log = tmp_path / f"job-{self.id}.out"

    def info(self) -> dict:
        out = subprocess.run(["scontrol", "show", "job", "-o", self.id], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)

    def wait(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if info["JobState"] in TERMINAL_STATES:
                return info
            time.sleep(2)
        pytest.fail(f"job {self.id} still {self.info()['JobState']} after {timeout}s\n{self.output()}")

    def wait_for_step(self, step: int, timeout: float) -> None:
        """Until metrics.jsonl records RL step `step` (the job is training)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(r["step"] >= step for r in _records(self.run_dir)):
                return
            assert self.info()["JobState"] in ("PENDING", "RUNNING"), self.output()
            time.sleep(1)
        pytest.fail(f"job {self.id} did not reach step {step} in {timeout}s\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text()[-6000:] if self.log.exists() else "(no job output)"

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], capture_output=True, timeout=30)


@pytest.fixture
def submit(tmp_path):
    jobs = []

    def make(*args, **kwargs) -> Job:
        jobs.append(Job(tmp_path, *args, **kwargs))
        return jobs[-1]

    yield make
    for job in jobs:
        job.cancel()
        shutil.rmtree(f"/tmp/ray_{job.id}", ignore_errors=True)  # the job's Ray session (RAY_TMPDIR default)


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return read_jsonl(str(path)) if path.exists() else []


def _checkpoints(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(os.listdir(root)) if root.is_dir() else []


def _job_processes(job_id: str) -> list[str]:
    """Processes still running that were started by the job: Slurm puts SLURM_JOB_ID in every step's environment,
    and Ray's daemons, workers and the vLLM engines inherit it; Ray's daemons also name the job's temp dir."""
    marker, temp_dir = f"SLURM_JOB_ID={job_id}".encode(), f"/tmp/ray_{job_id}/".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if marker in environ or temp_dir in cmdline:
            found.append(f"{pid}: " + cmdline.replace(b"\0", b" ").decode(errors="replace")[:160])
    return found


def _assert_nothing_left(job: Job, timeout: float = 60) -> None:
    """No process of the job (raylet, gcs_server, Ray workers, engines, trainer) survives it. Slurm kills what is
    left of a step KillWait=30 s after SIGTERM, so wait up to a minute before calling a process left behind."""
    deadline = time.monotonic() + timeout
    while (left := _job_processes(job.id)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, "processes left behind:\n" + "\n".join(left)
    ray_daemons = subprocess.run(["pgrep", "-af", f"(raylet|gcs_server).*/tmp/ray_{job.id}/"],
                                 capture_output=True, text=True).stdout
    assert ray_daemons == "", ray_daemons


def test_clean_stop_checkpoints_and_the_resumed_job_completes(submit):
    # 1. stopped cleanly: what the time limit's `#SBATCH --signal=B:TERM@...` does is SIGTERM to the batch shell
    # only; it forwards it to the trainer, which finishes its step, checkpoints and exits; then Ray is stopped
    first = submit("run.steps=1000")
    first.wait_for_step(1, timeout=600)
    subprocess.run(["scancel", "--batch", "--signal=TERM", first.id], check=True, timeout=30)
    info = first.wait(timeout=300)
    log = first.output()
    assert "forwarding SIGTERM to the trainer (step" in log, log
    _assert_nothing_left(first)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "[wait_for_ray] ready: 1 node(s)" in log and "[stop] SIGTERM" in log and "stopping Ray" in log
    assert (first.run_dir / "logs" / f"job_{first.id}" / "ray-head.log").exists()
    stopped_at = _records(first.run_dir)[-1]["step"]
    assert 1 <= stopped_at < 1000
    assert _checkpoints(first.run_dir)[-1] == f"step_{stopped_at:06d}", log  # the step it stopped at is saved

    # 2. RESUME=1 continues the same run from that checkpoint and runs to its end: one more step, none repeated
    second = submit(f"run.steps={stopped_at + 1}", RESUME="1")
    info = second.wait(timeout=600)
    log = second.output()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert f"[resume] continuing from step {stopped_at}" in log and "done (exit status 0)" in log
    records = _records(second.run_dir)
    assert [r["step"] for r in records] == list(range(1, stopped_at + 2)), log
    assert all("rollout/reward_mean" in r and "train/loss" in r for r in records)
    assert _checkpoints(second.run_dir)[-1] == f"step_{stopped_at + 1:06d}"
    _assert_nothing_left(second)


@pytest.mark.slow  # ~5 min: two Slurm jobs, each starting Ray, the actors and an engine (run with -m slow)
def test_requeued_job_continues_from_its_checkpoint_by_itself(submit):
    """The time limit's signal (#SBATCH --signal=B:USR1@900): the trainer checkpoints, the job requeues itself and
    resumes; then an operator's (or preemption's) `scontrol requeue`: the job restarts and resumes from its latest
    complete checkpoint. Nobody resubmits; the run ends with every step exactly once."""
    steps = 6
    job = submit(f"run.steps={steps}")
    job.wait_for_step(2, timeout=600)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job.id], check=True, timeout=30)
    _wait_restarts(job, 1, timeout=600)
    _wait_resumed_and_trained(job, resumes=1, timeout=600)
    subprocess.run(["scontrol", "requeue", job.id], check=True, timeout=30)
    _wait_restarts(job, 2, timeout=600)
    info = job.wait(timeout=900)
    log = job.log.read_text()  # all three attempts (--open-mode=append)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.output()
    assert "requeueing job" in log and f"restart 1 of job {job.id}" in log and f"restart 2 of job {job.id}" in log
    assert log.count("[resume] continuing from step") == 2, log
    assert [r["step"] for r in _records(job.run_dir)] == list(range(1, steps + 1))  # each step once, in order
    _assert_nothing_left(job)


def _wait_resumed_and_trained(job: Job, resumes: int, timeout: float) -> None:
    """Until the job's log shows its `resumes`-th resume and the resumed run has trained one more step."""
    import re

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = job.log.read_text() if job.log.exists() else ""
        found = [int(m) for m in re.findall(r"\[resume\] continuing from step (\d+)", text)]
        if len(found) >= resumes and any(r["step"] > found[resumes - 1] for r in _records(job.run_dir)):
            return
        time.sleep(1)
    pytest.fail(f"job {job.id} did not resume and train within {timeout}s\n{job.output()}")


def _wait_restarts(job: Job, restarts: int, timeout: float) -> None:
    """Until Slurm restarted the job `restarts` times. Slurm holds a requeued job pending for a couple of minutes
    (EligibleTime = requeue + 121 s); on this one-node test cluster the test lets it start at once (StartTime=now;
    the script is not involved)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job.info()
        if int(info.get("Restarts", "0")) >= restarts and info["JobState"] != "PENDING":
            return
        if info["JobState"] == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job.id}", "StartTime=now"], capture_output=True, timeout=30)
        time.sleep(2)
    pytest.fail(f"job {job.id} was not restarted {restarts} time(s) in {timeout}s\n{job.output()}")


def test_cancelled_job_leaves_no_ray_processes(submit):
    job = submit("run.steps=1000")
    job.wait_for_step(1, timeout=600)
    assert _job_processes(job.id), "the running job shows no processes: the leak check below would prove nothing"
    subprocess.run(["scancel", job.id], check=True, timeout=30)
    info = job.wait(timeout=300)
    assert info["JobState"] == "CANCELLED", job.output()
    _assert_nothing_left(job)
