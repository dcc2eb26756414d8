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


def test_train_without_a_config_is_the_embedded_quickstart(tmp_path, monkeypatch, capsys):
    """`megatron-rl train` with no --config loads the packaged quickstart (here only resolved and printed)."""
    from megatron_rl.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--print-config", "run.steps=3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
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
def test_eval_flags_are_checked_before_anything_starts(tmp_path, monkeypatch, capsys, flags, message):
    """In-process (the command's own code path): exit status 2 and the flag named, before a checkpoint is converted
    or an engine starts -- nothing is written."""
    from megatron_rl.cli import main

    monkeypatch.chdir(tmp_path)
    try:
        status = main(["eval", *flags, f"run.output_dir={tmp_path}"])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    assert status == 2 and message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_train_with_bad_data_exits_2_before_ray_starts(tmp_path):
    """A prompt file without the ground-truth column: a data error naming the column, found while the prompts are
    read (after the tiny model is made, before Ray, the actor or vLLM start)."""
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "What is 1+1?", "solution": "2"}\n')
    start = time.monotonic()
    out = _cli("train", "data.synthetic=null", f"data.train.path={data}", "data.train.layout=simple",
               "warmup.steps=0", f"run.output_dir={tmp_path / 'runs'}", cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "data error:" in out.stderr and "missing column(s) ['answer']" in out.stderr
    assert "data.train.ground_truth_key" in out.stderr  # the fix is named, under its config key
    assert "[setup] starting" not in out.stdout  # no actor or engine was started
    assert time.monotonic() - start < 120
