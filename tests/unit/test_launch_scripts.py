"""The Slurm launch scripts (examples/luspo_*.sh) without Slurm: DRY_RUN prints the exact commands of a job, and the
trainer command line they print is a configuration that validates for the intended GPUs, with the released Qwen
config.json contents (no weights needed: validation reads config.json only)."""
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_rl.config import ConfigError, load_config
from tests.unit.models.test_qwen_arch import QWEN3_30B_A3B, QWEN25_7B

REPO = Path(__file__).resolve().parents[2]
MOE_SCRIPT = "examples/luspo_30b_moe.sh"
DENSE_SCRIPT = "examples/luspo_qwen2.5_7b.sh"


def _run(script, *args, **env):
    """The script outside Slurm (every SLURM_ variable removed), with `env` added."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_"))}
    base.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", script, *args], cwd=REPO, env=base, capture_output=True, text=True, timeout=60)


def _dry_run(script, *args, **env):
    result = _run(script, *args, DRY_RUN=1, **env)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line and not line.startswith("#")]


def _one(lines, *needles):
    found = [line for line in lines if all(n in line for n in needles)]
    assert len(found) == 1, (needles, lines)
    return found[0]


def _trainer_overrides(lines):
    """The overrides of the printed `megatron-rl train` command, and its flags."""
    words = shlex.split(_one(lines, "megatron-rl train"))
    tail = words[words.index("train") + 1:]
    assert tail[:2] == ["--config", tail[1]]
    return tail[1], [w for w in tail[2:] if not w.startswith("--")], [w for w in tail[2:] if w.startswith("--")]


def test_moe_dry_run_prints_the_commands_of_a_4_node_job(tmp_path):
    lines = _dry_run(MOE_SCRIPT, OUTPUT_DIR=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # printed, not run
    assert lines[0] == "export RAY_AUTH_MODE=token" and lines[1].startswith("export RAY_AUTH_TOKEN=$(")
    log_dir = f"{tmp_path}/out/qwen3_30b_a3b_luspo/logs/job_dryrun"
    assert lines[2] == f"mkdir -p {log_dir}"
    assert lines[3] == ("srun --overlap --nodes=1 --ntasks=1 --nodelist=node001 hostname --ip-address"
                        "   # HEAD_IP below = the first non-loopback address it prints")
    step = "srun --overlap --ntasks-per-node=1 --cpus-per-task=64 --mem=0"
    ray_args = "--num-cpus=64 --num-gpus=8 --temp-dir=/tmp/ray_dryrun --disable-usage-stats --block"
    assert lines[4] == (
        f"{step} --nodes=1 --ntasks=1 --nodelist=node001 --job-name=ray-head --gpus-per-node=8 "
        f"--output={log_dir}/ray-head.log ray start --head --node-ip-address=HEAD_IP --port=6379 "
        f"--include-dashboard=false {ray_args} &")
    assert lines[5] == (f"{step} --nodes=1 --ntasks=1 --nodelist=node001 --job-name=wait-for-ray python3 "
                        "examples/lib/wait_for_ray.py --address=HEAD_IP:6379 --nodes=1 --gpus=8 --timeout=600")
    assert lines[6] == (
        f"{step} --nodes=3 --ntasks=3 --nodelist=node002,node003,node004 --job-name=ray-workers --gpus-per-node=8 "
        f"--output={log_dir}/ray-worker-%N.log ray start --address=HEAD_IP:6379 {ray_args} &")
    assert lines[7] == (f"{step} --nodes=1 --ntasks=1 --nodelist=node001 --job-name=wait-for-ray python3 "
                        "examples/lib/wait_for_ray.py --address=HEAD_IP:6379 --nodes=4 --gpus=32 --timeout=600")
    assert lines[8] == (
        f"{step} --nodes=1 --ntasks=1 --nodelist=node001 --job-name=megatron-rl-trainer env RAY_ADDRESS=HEAD_IP:6379 "
        f"megatron-rl train --config examples/configs/qwen3_30b_a3b_luspo.yaml run.output_dir={tmp_path}/out "
        "run.name=qwen3_30b_a3b_luspo resources.ray_address=auto resources.device=gpu resources.num_gpus=32 "
        "resources.actor_ranks=16 rollout.num_engines=8 rollout.engine.tensor_parallel_size=2")
    assert len(lines) == 9


def test_dense_dry_run_is_one_node_without_workers():
    lines = _dry_run(DENSE_SCRIPT)
    assert not any("ray-workers" in line for line in lines)
    assert sum("wait_for_ray.py" in line for line in lines) == 1
    config, overrides, flags = _trainer_overrides(lines)
    assert config == "examples/configs/qwen2.5_7b_luspo.yaml" and flags == []
    assert overrides[-4:] == ["resources.num_gpus=8", "resources.actor_ranks=4", "rollout.num_engines=4",
                              "rollout.engine.tensor_parallel_size=1"]


def test_knobs_reach_the_commands():
    lines = _dry_run(MOE_SCRIPT, "--resume", "run.steps=7", "rollout.engine.engine_kwargs={a: 1}",
                     NODES=2, GPUS_PER_NODE=4, ACTOR_GPUS=4, ENGINE_TP=4, CPUS_PER_NODE=12, RUN_NAME="r1",
                     MODEL_PATH="/m/q3", TRAIN_DATA="/d/train.parquet", EXTRA_OVERRIDES="eval.every=0 run.seed=3",
                     RAY_PORT=7000, RAY_HEAD_IP="10.1.2.3", CONTAINER_IMAGE="/img/mrl.sqsh")
    assert not any("hostname --ip-address" in line for line in lines)  # RAY_HEAD_IP given
    for line in lines:
        if line.startswith("srun"):
            assert "--container-image=/img/mrl.sqsh" in line and "--container-workdir=/workspace/megatron_rl" in line
            assert "--cpus-per-task=12" in line
    _one(lines, "ray start --head --node-ip-address=10.1.2.3 --port=7000", "--num-gpus=4")
    _one(lines, "--nodes=1 --ntasks=1 --nodelist=node002 --job-name=ray-workers", "--address=10.1.2.3:7000")
    _, overrides, flags = _trainer_overrides(lines)
    assert flags == ["--resume"]
    assert overrides == ["run.output_dir=" + str(REPO / "runs"), "run.name=r1", "resources.ray_address=auto",
                         "resources.device=gpu", "resources.num_gpus=8", "resources.actor_ranks=4",
                         "rollout.num_engines=1", "rollout.engine.tensor_parallel_size=4", "model.path=/m/q3",
                         "data.train.path=/d/train.parquet", "eval.every=0", "run.seed=3", "run.steps=7",
                         "rollout.engine.engine_kwargs={a: 1}"]
    # the printed line reads back as the same words (the override with spaces is quoted)
    assert "'rollout.engine.engine_kwargs={a: 1}'" in _one(lines, "megatron-rl train")
    assert _trainer_overrides(_dry_run(MOE_SCRIPT, RESUME=1))[2] == ["--resume"]


@pytest.mark.parametrize("args, env, message", [
    ((), {}, "not inside a Slurm job"),
    (("--frobnicate",), {"DRY_RUN": 1}, "unknown flag --frobnicate"),
    (("steps",), {"DRY_RUN": 1}, "unexpected argument 'steps'"),
    ((), {"DRY_RUN": 1, "RAY_LOOPBACK": 1}, "RAY_LOOPBACK=1 keeps Ray on 127.0.0.1: single-node jobs only"),
    ((), {"DRY_RUN": 1, "ENGINE_TP": 3}, "not a multiple of ENGINE_TP=3"),
    ((), {"DRY_RUN": 1, "NODES": "two"}, "NODES must be a whole number"),
    ((), {"DRY_RUN": 1, "CONFIG": "examples/configs/nope.yaml"}, "CONFIG=examples/configs/nope.yaml not found"),
    ((), {"DRY_RUN": 1, "NODES": 2, "RAY_HEAD_IP": "127.0.1.1"}, "127.0.1.1 (node node001) is a loopback address"),
])
def test_bad_settings_fail_with_the_knob_named(args, env, message):
    result = _run(MOE_SCRIPT, *args, **env)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stdout == ""  # nothing printed as if it would run


@pytest.mark.parametrize("script", [MOE_SCRIPT, DENSE_SCRIPT])
def test_a_requeued_job_resumes_and_the_time_limit_requeues(script):
    """Restarted by Slurm (SLURM_RESTART_COUNT > 0: a requeue, a preemption, the time limit's self-requeue), the job
    passes --resume; the script asks Slurm for SIGUSR1 before the time limit and to be requeueable."""
    _, _, flags = _trainer_overrides(_dry_run(script))
    assert "--resume" not in flags
    restarted = _run(script, DRY_RUN=1, SLURM_RESTART_COUNT=2)
    assert restarted.returncode == 0, restarted.stderr
    assert "restart 2 of job" in restarted.stdout + restarted.stderr
    _, _, flags = _trainer_overrides([line for line in restarted.stdout.splitlines() if line and not line.startswith("#")])
    assert "--resume" in flags
    text = (REPO / script).read_text()
    assert "#SBATCH --signal=B:USR1@900" in text and "#SBATCH --requeue" in text and "#SBATCH --open-mode=append" in text
    assert "scontrol requeue" in restarted.stdout  # the plan printed for the SIGUSR1 handler


def test_help_prints_the_documented_settings():
    result = _run(DENSE_SCRIPT, "--help")
    assert result.returncode == 0
    for knob in ("NODES=1", "GPUS_PER_NODE=8", "CONTAINER_IMAGE", "RESUME=0", "REQUEUE=1", "DRY_RUN=0",
                 "#SBATCH --nodes=1"):
        assert knob in result.stdout, knob


def _model_dir(tmp_path, hf_config) -> str:
    path = tmp_path / hf_config["model_type"]
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config))
    return str(path)


@pytest.mark.parametrize("script, hf_config, env, expect", [
    # (actor ranks, dense DP) for the default and a larger allocation of each script
    (MOE_SCRIPT, QWEN3_30B_A3B, {}, (16, 8)),
    (MOE_SCRIPT, QWEN3_30B_A3B, {"NODES": 8}, (32, 16)),
    (DENSE_SCRIPT, QWEN25_7B, {}, (4, 2)),
    (DENSE_SCRIPT, QWEN25_7B, {"NODES": 2}, (8, 4)),
])
def test_printed_trainer_config_validates_for_the_allocation(tmp_path, script, hf_config, env, expect):
    config, overrides, _ = _trainer_overrides(_dry_run(script, MODEL_PATH=_model_dir(tmp_path, hf_config), **env))
    cfg = load_config(str(REPO / config), overrides)
    assert (cfg.resources.actor_ranks, cfg.actor.layout.data_parallel_size(cfg.resources.actor_ranks)) == expect
    assert cfg.resources.device == "gpu" and cfg.actor.dtype == "bfloat16"
    assert cfg.actor.optimizer.distributed_optimizer and cfg.actor.layout.use_sequence_parallel
    gpus = cfg.resources.actor_ranks + cfg.rollout.num_engines * cfg.rollout.engine.tensor_parallel_size
    assert gpus == cfg.resources.num_gpus == int(env.get("NODES", 4 if script == MOE_SCRIPT else 1)) * 8
    if hf_config is QWEN3_30B_A3B:
        assert (cfg.actor.layout.ep, cfg.actor.layout.tp) == (8, 2)


def test_yaml_defaults_validate_with_the_released_configs(tmp_path):
    """The YAML files on their own (no launch script): the layouts they state fit the released models."""
    for name, hf_config in (("qwen3_30b_a3b_luspo", QWEN3_30B_A3B), ("qwen2.5_7b_luspo", QWEN25_7B)):
        cfg = load_config(str(REPO / f"examples/configs/{name}.yaml"), [f"model.path={_model_dir(tmp_path, hf_config)}"])
        assert cfg.actor.loss.name == "luspo" and cfg.algorithm.lspo.enabled


def test_a_layout_that_does_not_fit_is_refused(tmp_path):
    """12 actor GPUs cannot hold EP=8: the error names the setting before any job starts."""
    _, overrides, _ = _trainer_overrides(_dry_run(MOE_SCRIPT, ACTOR_GPUS=12,
                                                  MODEL_PATH=_model_dir(tmp_path, QWEN3_30B_A3B)))
    with pytest.raises(ConfigError, match="actor.layout.etp x actor.layout.ep x actor.layout.pp = 1x8x1 = 8 does not divide"):
        load_config(str(REPO / "examples/configs/qwen3_30b_a3b_luspo.yaml"), overrides)


@pytest.mark.parametrize("printed, expected", [
    ("127.0.1.1 10.1.2.3\n", "10.1.2.3"),  # Debian's /etc/hosts maps the host name to 127.0.1.1 first
    ("10.0.0.1 10.0.0.2\n", "10.0.0.1"),
    ("127.0.1.1\n", "127.0.1.1"),  # only loopback: kept, so the multi-node check can name it
    ("", ""),
])
def test_head_address_is_the_first_non_loopback_one(printed, expected):
    """What the launch script takes from `hostname --ip-address` on the head node (mrl_first_address)."""
    result = subprocess.run(["bash", "-c", "source examples/lib/ray_cluster.sh && mrl_first_address"], cwd=REPO,
                            input=printed, capture_output=True, text=True, timeout=30, check=True)
    assert result.stdout.strip() == expected


def _wait_for_ray(*args, timeout=60):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # 127.0.0.1 stays 127.0.0.1 (as RAY_LOOPBACK=1)
    return subprocess.run([sys.executable, "examples/lib/wait_for_ray.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wait_for_ray_refuses_a_malformed_address():
    result = _wait_for_ray("--address", "node001", "--nodes", "1")
    assert result.returncode == 2 and "--address must be host:port" in result.stderr


def test_wait_for_ray_gives_up_at_its_timeout_when_no_head_listens():
    """Nothing listens on the port: exit 1 after --timeout (ray.init alone would retry for minutes)."""
    start = time.monotonic()
    result = _wait_for_ray("--address", f"127.0.0.1:{_free_port()}", "--nodes", "1", "--timeout", "2")
    assert result.returncode == 1 and "no Ray head listens at 127.0.0.1:" in result.stderr, result.stderr
    assert time.monotonic() - start < 30  # 2 s of probing + interpreter start-up, not Ray's internal retries


@pytest.mark.ray
def test_wait_for_ray_against_a_real_head():
    """Ready when the nodes are there; a clear timeout naming what joined when they are not."""
    from megatron_rl.cluster.ray_cluster import local_ray_cluster

    with local_ray_cluster(num_cpus=1, object_store_bytes=128 << 20) as info:
        address = info["gcs_address"]
        ready = _wait_for_ray("--address", address, "--nodes", "1", "--timeout", "60", timeout=120)
        assert ready.returncode == 0 and "ready: 1 node(s), 1 CPUs, 0 GPUs" in ready.stdout, ready.stderr
        missing = _wait_for_ray("--address", address, "--nodes", "2", "--gpus", "8", "--timeout", "3", timeout=120)
        assert missing.returncode == 1, missing.stderr
        assert "1/2 node(s) and 0/8 GPUs joined" in missing.stderr
