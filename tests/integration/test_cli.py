"""The `megatron-rl` console script as a user runs it."""
import os
import subprocess
import sys
import time

import pytest
import yaml


def _run(*args, timeout=300):
    return subprocess.run(["megatron-rl", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands():
    out = _run("--help")
    assert out.returncode == 0 and "verify-model" in out.stdout
    out = _run("verify-model", "--help")
    assert out.returncode == 0 and "--tp" in out.stdout and "examples:" in out.stdout


@pytest.mark.distributed
def test_verify_model_tiny_passes():
    out = _run("verify-model", "--tiny", "qwen3", "--tp", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS" in out.stdout and "bit-exact" in out.stdout


def test_verify_model_bad_layout_exits_2(tmp_path):
    out = _run("verify-model", "--tiny", "qwen3", "--tp", "3")
    assert out.returncode == 2 and "parallel.tp=3 does not divide" in out.stderr


def test_readme_commands_are_what_ci_runs():
    cmd = subprocess.run([sys.executable, ".ci/readme_commands.py", "1"], capture_output=True, text=True, check=True)
    assert cmd.stdout.startswith("bash tools/install_cpu.sh && megatron-rl ")
    cmd = subprocess.run([sys.executable, ".ci/readme_commands.py", "2"], capture_output=True, text=True, check=True)
    assert "pytest" in cmd.stdout


def _cli(*args, cwd=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "megatron_rl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_train_without_a_config_is_the_embedded_quickstart(tmp_path):
    """`megatron-rl train` with no --config loads the packaged quickstart (here only resolved and printed)."""
    out = _cli("train", "--print-config", "run.steps=3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["run"]["name"] == "quickstart" and cfg["run"]["steps"] == 3
    assert cfg["model"]["tiny_arch"] == "qwen3" and cfg["actor"]["loss"]["name"] == "luspo"
    assert cfg["algorithm"]["lspo"]["enabled"] is True and cfg["data"]["synthetic"]["task"] == "arithmetic"
    assert os.listdir(tmp_path) == []  # printing the config writes nothing


@pytest.mark.parametrize("flags, message", [
    (["--n", "2", "--pass-k", "1,4"], "--pass-k: eval pass@k needs 1 <= k <= sampling.n=2; got k=[4]"),
    (["--pass-k", "1 8"], "expected comma-separated integers such as 1,8"),
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--temperature", "-1"], "--temperature / --max-tokens (or the config's eval section): sampling.temperature"),
    (["--model", "no/such/model"], "no model to evaluate at 'no/such/model'"),
])
def test_eval_flags_are_checked_before_anything_starts(tmp_path, flags, message):
    start = time.monotonic()
    out = _cli("eval", *flags, f"run.output_dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert time.monotonic() - start < 60  # seconds (Python start-up on a busy machine), no engine or conversion
    assert os.listdir(tmp_path) == []
