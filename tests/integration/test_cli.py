"""The `megatron-rl` console script as a user runs it."""
import subprocess
import sys

import pytest


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
