"""The trainer's pure helpers: mini-batch split, the combination of their metrics, and the training-checkpoint /
metrics-history files a resume depends on (a stand-in actor group writes the model part: the files around it, their
atomicity and retention are what is under test; the real actor's checkpoint is tested in tests/distributed)."""
import json
import os
import random

import pytest
import torch

from megatron_rl.actor.batch import ActorBatch
from megatron_rl.training.update import combine_mini_batches as _combine_mini_batches
from megatron_rl.training.update import split_mini_batches as _split
from megatron_rl.checkpoint.run_state import (
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    remove_unfinished,
    restore_metrics,
    save_training_checkpoint,
)
from megatron_rl.training.metrics_logger import MetricsLogger, read_jsonl, summary_line, truncate_jsonl


def _batch(n=7):
    return ActorBatch(
        prompt_ids=[[1, i + 2] for i in range(n)], response_ids=[[3] * (i + 1) for i in range(n)],
        advantages=torch.arange(n, dtype=torch.float32), old_log_probs=[[-0.1 * i] * (i + 1) for i in range(n)],
        loss_mask=[[True] * (i + 1) for i in range(n)],
    )


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_split_keeps_every_sequence_once_in_order_with_its_fields(parts):
    batch = _batch()
    minis = list(_split(batch, parts))
    assert len(minis) == parts
    assert [p.tolist() for m in minis for p in m.prompt_ids] == [p.tolist() for p in batch.prompt_ids]
    assert torch.equal(torch.cat([m.advantages for m in minis]), batch.advantages)
    for m in minis:  # per-token fields travel with their sequence
        assert all(lp.numel() == r.numel() for lp, r in zip(m.old_log_probs, m.response_ids))
        assert all(lm.numel() == r.numel() for lm, r in zip(m.loss_mask, m.response_ids))


@pytest.mark.parametrize("groups, parts, sizes", [(3, 2, [8, 4]), (4, 2, [8, 8]), (3, 4, [4, 4, 4]), (5, 3, [8, 4, 8])])
def test_split_never_cuts_a_group(groups, parts, sizes):
    batch = _batch(groups * 4)
    minis = list(_split(batch, parts, group_size=4))
    assert [len(m) for m in minis] == sizes  # whole groups of 4, as even as they can be; none empty
    assert torch.equal(torch.cat([m.advantages for m in minis]), batch.advantages)
    with pytest.raises(ValueError, match="not made of whole groups of 4"):
        list(_split(_batch(6), 2, group_size=4))


def test_combined_metrics_sum_counts_and_average_the_rest():
    steps = [{"loss": 1.0, "grad_norm": 2.0, "seq_clip_frac_low": 0.0, "model_tokens": 10.0, "step_seconds": 1.0,
              "num_sequences": 4.0, "tokens_per_second": 10.0},
             {"loss": 3.0, "grad_norm": 4.0, "seq_clip_frac_low": 0.5, "model_tokens": 30.0, "step_seconds": 3.0,
              "num_sequences": 4.0, "tokens_per_second": 10.0}]
    combined = _combine_mini_batches(steps)
    assert combined["loss"] == 2.0 and combined["grad_norm"] == 3.0 and combined["seq_clip_frac_low"] == 0.25
    assert combined["model_tokens"] == 40.0 and combined["num_sequences"] == 8.0 and combined["step_seconds"] == 4.0
    assert combined["tokens_per_second"] == 10.0 and combined["optimizer_steps"] == 2.0


class StandInActorGroup:
    """Writes a model file the way the actor ranks do (into the directory it is given) and answers rank 0's small
    state, as ActorGroup.save_checkpoint does; can crash mid-write."""

    def __init__(self):
        self.crash = False

    def save_checkpoint(self, directory):
        with open(os.path.join(directory, "model.bin"), "w") as f:
            f.write("weights")
        if self.crash:
            raise RuntimeError("killed while writing the optimizer")
        return {"iteration": 1}


def _write_metrics(path, steps):
    with open(path, "w") as f:
        f.writelines(json.dumps({"step": s, "x": float(s)}) + "\n" for s in steps)


def test_checkpoints_are_atomic_complete_and_only_the_last_k_are_kept(tmp_path):
    root, metrics = str(tmp_path / "checkpoints"), str(tmp_path / "metrics.jsonl")
    group = StandInActorGroup()
    for step in range(1, 5):
        _write_metrics(metrics, range(1, step + 1))
        save_training_checkpoint(root, step, group, {"sampler": {"position": step}}, metrics_path=metrics, keep_last=2)
    assert [s for s, _ in list_checkpoints(root)] == [3, 4]  # keep_last=2: steps 1 and 2 were deleted
    step, path = latest_checkpoint(root)
    assert step == 4 and sorted(os.listdir(path)) == ["metrics.jsonl", "model.bin", "rng.pt", "trainer_state.json"]
    assert [r["step"] for r in read_jsonl(os.path.join(path, "metrics.jsonl"))] == [1, 2, 3, 4]

    group.crash = True  # a crash (or kill -9) while step 5 is written: step 5 must never look complete
    with pytest.raises(RuntimeError, match="killed while writing"):
        save_training_checkpoint(root, 5, group, {"sampler": {"position": 5}}, metrics_path=metrics, keep_last=2)
    assert [s for s, _ in list_checkpoints(root)] == [3, 4] and latest_checkpoint(root)[0] == 4
    leftovers = [n for n in os.listdir(root) if n.startswith("step_000005.tmp-")]
    assert len(leftovers) == 1
    assert remove_unfinished(root) == leftovers and sorted(os.listdir(root)) == ["step_000003", "step_000004"]


def test_trainer_state_and_rng_come_back(tmp_path):
    root = str(tmp_path / "checkpoints")
    random.seed(5)
    torch.manual_seed(5)
    save_training_checkpoint(root, 7, StandInActorGroup(), {"sampler": {"epoch": 1, "position": 3}},
                             metrics_path=None, keep_last=1)
    expected = (random.random(), torch.rand(3))
    random.seed(99)
    torch.manual_seed(99)
    state = load_trainer_state(latest_checkpoint(root)[1])
    assert (random.random(), torch.rand(3).tolist()) == (expected[0], expected[1].tolist())
    assert state["step"] == 7 and state["sampler"] == {"epoch": 1, "position": 3} and state["actor"] == {"iteration": 1}


def test_resume_cuts_the_metrics_history_back_to_the_checkpoint(tmp_path):
    """The run logged steps 1-3 (the last line torn by the kill) but its checkpoint is step 2: the resumed run's
    file must read 1, 2, then what it logs next -- as if it had never been interrupted."""
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    run_dir.mkdir()
    ckpt.mkdir()
    metrics = str(run_dir / "metrics.jsonl")
    _write_metrics(str(ckpt / "metrics.jsonl"), [1, 2])
    _write_metrics(metrics, [1, 2, 3])
    with open(metrics, "a") as f:
        f.write('{"step": 4, "x": 4.')
    restore_metrics(str(ckpt), metrics)
    logger = MetricsLogger(str(run_dir), tensorboard=False, resume_step=2)
    logger.log(3, {"x": torch.tensor(30.0)})
    logger.close()
    assert read_jsonl(metrics) == [{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}, {"step": 3, "x": 30.0}]

    _write_metrics(metrics, [1, 2, 3])
    with open(metrics, "a") as f:
        f.write('{"step": 2, "x"')  # torn
    truncate_jsonl(metrics, 2)
    assert [r["step"] for r in read_jsonl(metrics)] == [1, 2]


def test_summary_line_shows_what_a_researcher_watches():
    line = summary_line(3, 10, {"rollout/reward_mean": 0.5, "rollout/accuracy": 0.5, "rollout/response_length_mean": 12.0,
                                "sampling/final_groups": 4.0, "sampling/prompts_generated": 8.0, "train/loss": 0.1,
                                "time/step": 2.0, "time/rollout": 1.0, "eval/accuracy": 0.75})
    assert line.startswith("step 3/10 | reward 0.5 acc 0.5 | len 12.0 | groups 4/8 | loss 0.1")
    assert "gnorm -" in line and "EVAL acc 0.75" in line and line.endswith("2.0s (rollout 1.0)")
