"""Where a run's time goes outside its RL steps: start-up, first calls, shutdown, from the CLI's own output.

    rows = startup_rows(workdir)                    # runs `megatron-rl train` (the CPU quickstart) for a few steps
    rows = phase_rows(timestamped_lines, exit_s)    # or the phases of any timestamped log of the CLI

The run is the real command (`python -m megatron_rl.cli train`, what the console script runs) in a subprocess, its stdout and stderr read line by line and stamped with the
seconds since the process was started; the phases are the gaps between the lines the trainer prints anyway:

    [train] run dir ...                  <- python start, imports, config load and check
    [setup] starting ... vLLM engine(s)  <- tiny model, data, reward workers, Ray
    [warmup] N supervised steps          <- the Megatron ranks' start (the engines start in the background)
    [warmup] step N/N                    <- the warm-up (beside the starting engines)
    [eval] step 0                        <- first weight sync (waits for the engines) and the first evaluation
    step 1/                              <- the first RL step
    [checkpoint] step k saved ... (X s)  <- each save's own seconds: the first one pays any first-call set-up
    [train] done                         <- from the last line before it: the trainer's shutdown
    process exit                         <- exit

Lines that are missing (no warm-up, no evaluation at start) merge their phase into the next one.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

# (pattern of the line that ends the phase, the phase's name)
PHASES = (
    (r"^\[train\] run dir", "python start, imports, config load and check"),
    (r"^\[setup\] starting \d+ vLLM engine", "tiny model, data, reward workers, Ray start"),
    (r"^\[warmup\] \d+ supervised steps", "Megatron ranks start (engines start in the background)"),
    (r"^\[warmup\] step (\d+)/\1:", "supervised warm-up (beside the starting engines)"),
    (r"^\[eval\] step 0:", "first weight sync (waits for the engines) + first evaluation"),
    (r"^step 1/", "first RL step"),
)
_CHECKPOINT = re.compile(r"^\[checkpoint\] step (\d+) saved to .* \((\d+(?:\.\d+)?)s\)")
_DONE = re.compile(r"^\[train\] done")
_STEP = re.compile(r"^step (\d+)/\d+ ")


def phase_rows(lines: Sequence[tuple[float, str]], exit_s: float) -> list[dict[str, Any]]:
    """Rows (phase, seconds, ends_at_s) from (seconds since start, line) pairs of one `megatron-rl train` run and
    the second it exited. The RL steps themselves (from "step 1/" to the last step line) are one row, so the fixed
    costs stand out; checkpoints are listed with the seconds they printed."""
    rows, last = [], 0.0
    pending = list(PHASES)
    for at, line in lines:
        if pending:
            for index, (pattern, name) in enumerate(pending):
                if re.search(pattern, line):
                    merged = " + ".join(n for _, n in pending[:index + 1])
                    rows.append({"phase": merged, "seconds": round(at - last, 2), "ends_at_s": round(at, 2)})
                    last, pending = at, pending[index + 1:]
                    break
    steps = [(at, int(m.group(1))) for at, line in lines if (m := _STEP.match(line))]
    done = next((at for at, line in lines if _DONE.match(line)), None)
    if len(steps) > 1:  # up to the last line before shutdown: the last step's own checkpoint belongs here
        first_at = steps[0][0]
        end = max((at for at, _ in lines if done is None or at < done), default=steps[-1][0])
        rows.append({"phase": f"RL steps 2..{steps[-1][1]} (evaluations and checkpoints included)",
                     "seconds": round(end - first_at, 2), "ends_at_s": round(end, 2)})
        last = end
    for at, line in lines:
        if (m := _CHECKPOINT.match(line)):
            rows.append({"phase": f"  of which checkpoint at step {m.group(1)} (as printed)",
                         "seconds": float(m.group(2)), "ends_at_s": round(at, 2)})
    if done is not None:
        rows.append({"phase": "shutdown (engines, ranks, reward workers, Ray)", "seconds": round(done - last, 2),
                     "ends_at_s": round(done, 2)})
        last = done
    rows.append({"phase": "process exit", "seconds": round(exit_s - last, 2), "ends_at_s": round(exit_s, 2)})
    rows.append({"phase": "total (wall clock of the command)", "seconds": round(exit_s, 2), "ends_at_s": round(exit_s, 2)})
    return rows


def run_timestamped(cmd: Sequence[str], log_path: str, timeout_s: float = 3600) -> tuple[list[tuple[float, str]], float]:
    """Run cmd; every line of its output with the seconds since the start (also written to log_path), and the second
    it exited. Raises with the log's tail when it fails, TimeoutError when it runs past timeout_s (silent or not)."""
    start = time.perf_counter()
    lines: list[tuple[float, str]] = []
    with open(log_path, "w", encoding="utf-8") as log, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        watchdog = threading.Timer(timeout_s, proc.kill)  # a hung command prints nothing: kill it from outside
        watchdog.start()
        try:
            for line in proc.stdout:
                at = time.perf_counter() - start
                lines.append((at, line.rstrip("\n")))
                log.write(f"{at:9.3f} {line}")
            code = proc.wait()
        finally:
            watchdog.cancel()
    exit_s = time.perf_counter() - start
    if exit_s >= timeout_s and code != 0:
        raise TimeoutError(f"{' '.join(cmd)} ran past {timeout_s}s and was killed; log {log_path}")
    if code != 0:
        tail = "\n".join(line for _, line in lines[-30:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}); log {log_path}:\n{tail}")
    return lines, exit_s


def startup_rows(workdir: str, *, steps: int = 3, config: str | None = None,
                 overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """`megatron-rl train` (default: the CPU quickstart, warm-up and evaluation at start as configured) for `steps` RL
    steps with a checkpoint and an evaluation after each (the first and later saves and evaluations side by side),
    progress bars off; its phases (`phase_rows`)."""
    run_dir = os.path.join(os.path.abspath(workdir), "startup_run")
    if os.path.exists(run_dir):
        raise FileExistsError(f"{run_dir} already holds a run; give the startup benchmark a fresh --workdir")
    os.makedirs(workdir, exist_ok=True)
    # what the `megatron-rl` console script runs (cli.entry); the megatron_rl it imports follows PYTHONPATH, so a
    # checkout of other code can be measured with this benchmark (tools/BENCHMARKS.md, "Start-up and shutdown")
    cmd = [sys.executable, "-m", "megatron_rl.cli", "train"] + (["--config", config] if config else []) + [
        f"run.output_dir={os.path.abspath(workdir)}", "run.name=startup_run", f"run.steps={steps}",
        "checkpoint.every=1", "eval.every=1", "logging.progress_bars=false", *overrides]
    lines, exit_s = run_timestamped(cmd, os.path.join(os.path.abspath(workdir), "startup_run.log"))
    return phase_rows(lines, exit_s)
