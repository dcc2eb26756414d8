"""Skipping the separate old-log-prob forward (algorithm.skip_redundant_old_forward, the default) changes nothing
but time: with max_staleness 0 and one mini-batch the old policy IS the policy being trained, so the training
forward's own detached log-probs are the old ones. Two short runs, with and without the skip: every non-timing
metric (losses, gradient norms, ratios, clip fractions, the train/rollout mismatch) is identical, bit for bit."""
import math

import pytest

from tests.integration.test_train_e2e import _records, _train, _write_config, is_wall_clock

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def test_skipping_the_redundant_forward_changes_no_number(tmp_path):
    config = _write_config(tmp_path, **{"run.steps": 2, "eval.every": 0, "eval.at_start": False,
                                        "checkpoint.every": 0, "checkpoint.at_exit": False})
    runs = {}
    for skip in (True, False):
        out = tmp_path / f"skip_{skip}"
        result = _train(config, f"run.output_dir={out}", f"algorithm.skip_redundant_old_forward={str(skip).lower()}")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[skip] = _records(out / "t")
    compared = 0
    for a, b in zip(runs[True], runs[False], strict=True):
        for key, value in b.items():
            if is_wall_clock(key) or (isinstance(value, float) and math.isnan(value)):
                continue
            assert a[key] == value, (a["step"], key, a[key], value)
            compared += 1
    assert compared > 50 and "mismatch/mean_abs_diff" in runs[True][0] and "train/loss" in runs[True][0]
