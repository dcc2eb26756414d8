"""The GPU check script's dry run (what CI can run): it imports every check, plans them all, skips them with the
reason, writes the report and exits 0. The checks themselves need a CUDA GPU (run tools/gpu_check.sh there)."""
import multiprocessing as mp
import os
import subprocess
import time

import pytest

from megatron_rl.benchmarks import gpu_check


def test_dry_run_plans_and_skips_every_check(tmp_path):
    report = tmp_path / "plan.md"
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "--report", str(report)],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    text = report.read_text()
    assert text.startswith("# GPU check (dry run: nothing ran)")
    for name, _, check in gpu_check.CHECKS:
        assert f"| {name} | " in text and callable(check)
    assert text.count("| skipped | dry run |") == len(gpu_check.CHECKS)


def test_without_cuda_every_check_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    results = gpu_check.run_checks(str(tmp_path), dry_run=False)
    assert [r.status for r in results] == ["skipped"] * len(gpu_check.CHECKS)
    assert all(r.detail.startswith("no CUDA device") for r in results)


def test_a_failing_check_is_reported_and_the_rest_still_run(tmp_path, monkeypatch):
    def broken(workdir):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "CHECKS", [("a", "fails", broken), ("b", "works", lambda workdir: {"x": 1})])
    results = gpu_check.run_checks(str(tmp_path), dry_run=False)
    assert [r.status for r in results] == ["FAILED", "ok"]
    assert "RuntimeError: boom" in results[0].detail and results[1].numbers["x"] == 1
    assert "| a | fails | FAILED | RuntimeError: boom |" in gpu_check.report(results, dry_run=False)
    assert gpu_check.main(["--report", str(tmp_path / "r.md"), "--dry-run"]) == 0


def test_the_report_is_on_disk_after_every_check(tmp_path, monkeypatch):
    """A run stopped mid-way (the device's 10-minute command limit, a crash) leaves the report of the checks that
    ran: the second check finds the first one's result on disk and itself and the third as "not reached"."""
    path = tmp_path / "report.md"
    seen = {}

    def second(workdir):
        seen["text"] = path.read_text()
        return {"y": 2}

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "CHECKS", [("a", "first", lambda workdir: {"x": 1}), ("b", "second", second),
                                              ("c", "third", lambda workdir: {})])
    assert gpu_check.main(["--report", str(path), "--workdir", str(tmp_path)]) == 0
    assert "| a | first | ok | x=1, seconds=" in seen["text"]
    assert f"| b | second | not reached | {gpu_check.NOT_REACHED} |" in seen["text"]
    assert f"| c | third | not reached | {gpu_check.NOT_REACHED} |" in seen["text"]
    final = path.read_text()
    assert "not reached" not in final and "| b | second | ok | y=2" in final
    assert not (tmp_path / "report.md.partial").exists()


def test_a_check_this_machine_cannot_run_is_skipped_with_its_reason(tmp_path, monkeypatch):
    """The nccl transport check needs two GPUs: on fewer it is skipped (not failed) and says why."""
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(gpu_check, "CHECKS", [c for c in gpu_check.CHECKS if c[0] == "nccl_transport"])
    (result,) = gpu_check.run_checks(str(tmp_path), dry_run=False)
    assert result.status == "skipped" and result.detail.startswith("needs two GPUs, this machine has 1")


def _exit_at_once() -> None:
    os._exit(3)


def _stay_silent() -> None:
    time.sleep(60)


def test_the_ipc_round_trip_stops_waiting_when_the_receiver_dies_or_stays_silent():
    """On a device run limited to 10 minutes, a receiver that crashed (e.g. in the CUDA IPC open) fails the check
    at once rather than after the whole timeout; a silent one fails after its timeout."""
    spawn = mp.get_context("spawn")
    for target, timeout_s, message in ((_exit_at_once, 60, r"died \(exit code 3\)"),
                                       (_stay_silent, 3, "did not answer within 3 s")):
        child, outbox = spawn.Process(target=target), spawn.Queue()
        child.start()
        start = time.monotonic()
        try:
            with pytest.raises(AssertionError, match=message):
                gpu_check._reply(outbox, child, timeout_s=timeout_s)
            assert time.monotonic() - start < 30
        finally:
            child.kill()
            child.join(timeout=30)


def _wheel(folder, name: str, tag: str) -> None:
    """A minimal wheel of one module `name` (what pip needs: the module, METADATA, WHEEL, RECORD)."""
    import zipfile

    info = f"{name}-1.0.dist-info"
    files = {f"{name}.py": "VALUE = 1\n", f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / f"{name}-1.0-{tag}.whl", "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)


def test_carried_wheels_for_this_python_are_installed_before_the_check(tmp_path):
    """gpu_check.sh installs the wheels of GPU_CHECK_WHEELS (tools/gpu_wheels.sh fills .whl/) that fit this Python
    into a private folder on PYTHONPATH, and leaves those built for another Python alone (two builds of one package
    would stop pip)."""
    import sys

    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels, "carried_anywhere", "py3-none-any")
    _wheel(wheels, "carried_here", f"cp{sys.version_info[0]}{sys.version_info[1]}-none-any")
    _wheel(wheels, "carried_elsewhere", "cp27-none-any")
    env = {**os.environ, "GPU_CHECK_WHEELS": str(wheels), "TMPDIR": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "--report", str(tmp_path / "plan.md")],
                            capture_output=True, text=True, timeout=300, check=False, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "installing 2 carried wheel(s)" in result.stderr
    site = tmp_path / "megatron_rl_gpu_site"
    assert (site / "carried_anywhere.py").exists() and (site / "carried_here.py").exists()
    assert not (site / "carried_elsewhere.py").exists()
