"""Training starts from a converted Megatron checkpoint (model.megatron_checkpoint), not from model.path's weights.

Two tiny Qwen3 models of the same architecture and different seeds: A (model.path: config, tokenizer, the engines'
start-up weights) and B, converted with convert_from_hf into a TP=2 checkpoint (the actor runs TP=1: it reshards).
A one-step run must train and roll out with B's weights from the first step:
- the actor's recomputed old log-probs of step 1 equal transformers' log-probs of B on the same tokens;
- the engines' rollout log-probs equal them too (the engines were synced before the first rollout; without that
  they would generate with A's weights and the mismatch metric would be O(1));
- A's log-probs on those tokens are far from both (so the comparison can tell the two apart);
- the KL reference starts from the checkpoint as well: step 1's KL is ~0.
Tolerance 1e-4: fp32 everywhere; Megatron, vLLM and transformers differ only in kernels/summation order (~1e-5 on
these models); A and B differ by O(1) nats with initializer_range 0.2.

The trainer's own checkpoint of that run (runs/NAME/checkpoints/step_N) is accepted as model.megatron_checkpoint
too (same format). The conversion runs with --verify on a folder without tokenizer files (fixed token ids).
"""
import os

import pytest
import torch

from megatron_rl.checkpoint.convert import convert_from_hf
from megatron_rl.config import load_config
from megatron_rl.models.tiny import TinySize, make_tiny_model
from megatron_rl.parallel.layout import ParallelLayout
from megatron_rl.training.trainer import Trainer

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

SIZE = TinySize(hidden_size=64, num_layers=2, num_attention_heads=2, num_kv_heads=2, head_dim=32,
                intermediate_size=128, initializer_range=0.2)
TOL = 1e-4


class RecordingTrainer(Trainer):
    """The real trainer; it also keeps the step's batch (prompt/response ids, old and rollout log-probs)."""

    batches: list

    def _update(self, batch):
        metrics = super()._update(batch)  # fills batch.old_log_probs with the actor's log-probs before the update
        self.batches = [*getattr(self, "batches", []), batch]
        return metrics


def _transformers_log_probs(hf_dir, batch, temperature):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt, response in zip(batch.prompt_ids, batch.response_ids):
            ids = torch.cat([prompt, response]).unsqueeze(0)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
            out.append(torch.log_softmax(logits, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1))
    return out


def _max_diff(a, b):
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


def test_training_starts_from_the_converted_checkpoint(tmp_path):
    path_a = make_tiny_model("qwen3", tmp_path / "A", size=SIZE, seed=1)
    path_b = make_tiny_model("qwen3", tmp_path / "B", size=SIZE, seed=2)
    for name in os.listdir(path_b):  # weights + config only: --verify then uses fixed token ids
        if name.startswith("tokenizer"):
            os.remove(os.path.join(path_b, name))
    ckpt = str(tmp_path / "B_tp2")
    report = convert_from_hf(path_b, ckpt, ParallelLayout(tp=2), verify=True)
    assert report.parity.ok and "fixed token ids" in report.parity.input_source, report.parity

    out = tmp_path / "runs"
    cfg = load_config(None, [
        f"model.path={path_a}", f"model.megatron_checkpoint={ckpt}", f"run.output_dir={out}", "run.name=t",
        "run.steps=1", "run.seed=3", "data.synthetic.task=arithmetic", "data.synthetic.num_train=64",
        "data.synthetic.num_val=0", "algorithm.prompts_per_step=2", "sampling.n=4", "sampling.max_tokens=8",
        "sampling.temperature=1.0", "rollout.engine.dtype=float32", "rollout.engine.max_model_len=128",
        "actor.loss.kl_coef=0.01", "actor.max_tokens_per_microbatch=512",
        "algorithm.dynamic_sampling.on_cap=top_up", "algorithm.dynamic_sampling.top_up_with_zero_advantage=true",
        "algorithm.dynamic_sampling.max_rounds=1", "eval.every=0", "eval.at_start=false", "logging.tensorboard=false",
        "logging.progress_bars=false",
    ])
    assert cfg.actor.megatron_checkpoint == ckpt and cfg.rollout.engine.model == path_a
    trainer = RecordingTrainer(cfg, echo=lambda *a: None)
    metrics = trainer.run()
    (batch,) = trainer.batches

    from_b = _transformers_log_probs(path_b, batch, cfg.sampling.temperature)
    from_a = _transformers_log_probs(path_a, batch, cfg.sampling.temperature)
    assert _max_diff(from_a, from_b) > 0.1  # the two models are told apart by this test
    assert _max_diff(batch.old_log_probs, from_b) < TOL  # the actor computes with B's weights
    assert _max_diff(batch.rollout_log_probs, from_b) < TOL  # so do the engines, from step 1
    assert metrics["mismatch/max_abs_diff"] < TOL
    assert abs(metrics["train/kl"]) < 1e-6  # the KL reference is B too (k3 of identical forwards)

    # the run's own checkpoint (step_000001, written at exit) is a valid model.megatron_checkpoint too
    step_dir = out / "t" / "checkpoints" / "step_000001"
    again = load_config(None, [f"model.path={path_a}", f"model.megatron_checkpoint={step_dir}",
                               "data.synthetic.task=arithmetic"])
    assert again.actor.megatron_checkpoint == str(step_dir)
