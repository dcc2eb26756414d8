"""Runs several integration tests compare against, made once per session."""
from dataclasses import dataclass

import pytest

from tests.integration.train_runs import read_metrics, run_train, write_config

# The small config's uninterrupted run: 4 RL steps after the 40-step warm-up, a checkpoint after each step, no
# evaluation. The kill-and-resume test replays it; the skip-old-forward and colocation tests change one setting of
# the same config and must reproduce its numbers.
REFERENCE_CHANGES = {"run.steps": 4, "eval.every": 0, "eval.at_start": False}


@dataclass(frozen=True)
class ReferenceRun:
    config: str       # the config file (run.name "t"); pass run.output_dir=... to run it elsewhere
    records: list     # its metrics.jsonl, one dict per RL step
    stdout: str


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> ReferenceRun:
    tmp = tmp_path_factory.mktemp("reference_run")
    config = write_config(tmp, **REFERENCE_CHANGES)
    result = run_train(config, f"run.output_dir={tmp / 'runs'}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return ReferenceRun(config, read_metrics(tmp / "runs" / "t"), result.stdout)
