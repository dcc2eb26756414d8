"""Supervised warm-up + KL term: after the warm-up the KL reference is the warmed-up policy, so step 1's KL is ~0.

The warm-up (20 SFT steps at lr 3e-3) moves a random tiny model far from its start; had the reference stayed the
model at model.path, step 1's k3 KL would be O(0.1) nats or more. With the reset it is k3 of two identical
forwards: 0 up to float rounding (< 1e-6). The checkpoint written at exit carries the reset reference (reference/).
"""
import pytest

from megatron_rl.config import load_config
from megatron_rl.training.trainer import Trainer

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def test_kl_reference_is_the_warmed_up_policy(tmp_path):
    out = tmp_path / "runs"
    cfg = load_config(None, [
        f"run.output_dir={out}", "run.name=t", "run.steps=1", "run.seed=3",
        "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.num_attention_heads=2",
        "model.tiny.num_kv_heads=1", "model.tiny.head_dim=32", "model.tiny.intermediate_size=128",
        "data.synthetic.task=arithmetic", "data.synthetic.num_train=64", "data.synthetic.num_val=0",
        "warmup.steps=20", "warmup.batch_size=16", "warmup.lr=0.003", "actor.loss.kl_coef=0.01",
        "algorithm.prompts_per_step=2", "sampling.n=4", "sampling.max_tokens=8", "rollout.engine.dtype=float32",
        "rollout.engine.max_model_len=128", "actor.max_tokens_per_microbatch=512",
        "algorithm.dynamic_sampling.on_cap=top_up", "algorithm.dynamic_sampling.top_up_with_zero_advantage=true",
        "algorithm.dynamic_sampling.max_rounds=1", "eval.every=0", "eval.at_start=false",
        "logging.tensorboard=false", "logging.progress_bars=false",
    ])
    lines = []
    metrics = Trainer(cfg, echo=lines.append).run()
    assert "[warmup] KL reference set to the warmed-up policy" in lines
    assert abs(metrics["train/kl"]) < 1e-6, metrics["train/kl"]
    assert (out / "t" / "checkpoints" / "step_000001" / "reference" / "megatron_rl.json").is_file()
