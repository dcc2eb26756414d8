"""Skipping the separate old-log-prob forward (algorithm.skip_redundant_old_forward, the default) changes nothing
but time: with max_staleness 0 and one mini-batch the old policy IS the policy being trained, so the training
forward's own detached log-probs are the old ones. The session's reference run (the small config, which skips)
and the same config without the skip: every non-timing metric (losses, gradient norms, ratios, clip fractions,
the train/rollout mismatch) is identical, bit for bit."""
import math

import pytest

from tests.integration.train_runs import is_wall_clock, read_metrics, run_train

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def test_skipping_the_redundant_forward_changes_no_number(tmp_path, reference_run):
    out = tmp_path / "no_skip"
    result = run_train(reference_run.config, f"run.output_dir={out}", "algorithm.skip_redundant_old_forward=false")
    assert result.returncode == 0, result.stderr[-3000:]
    skipped, not_skipped = reference_run.records, read_metrics(out / "t")
    compared = 0
    for a, b in zip(skipped, not_skipped, strict=True):
        for key, value in b.items():
            if is_wall_clock(key) or (isinstance(value, float) and math.isnan(value)):
                continue
            assert a[key] == value, (a["step"], key, a[key], value)
            compared += 1
    assert compared > 50 and "mismatch/mean_abs_diff" in skipped[0] and "train/loss" in skipped[0]
