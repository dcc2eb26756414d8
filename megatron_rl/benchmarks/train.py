"""Training-step benchmarks of the Megatron actor (CPU here, GPU when present).

1. actor vs plain PyTorch: the same HF checkpoint and the same batch of full-length sequences (no padding);
   fwd + bwd + optimizer step with a per-token log-prob loss, through (a) the Megatron actor (LUSPO step)
   and (b) `transformers` + torch.optim.AdamW. Reported as tokens/s and the ratio.
2. packed vs padded: the actor on an RL-like batch whose lengths spread 10x (prompt + response from L/10 to L),
   once packing sequences into one THD stream and once padding each micro-batch to its longest sequence.
   Half the padded tokens are padding for a uniform spread, which is the case the target refers to.
Each variant runs in its own spawned process (fresh allocator, same thread count), warm-up steps excluded.
"""
from __future__ import annotations

import time

import torch

from megatron_rl.parallel.spawn import spawn_ranks


def _batch(num_sequences: int, min_len: int, max_len: int, vocab: int, seed: int):
    from megatron_rl.actor.batch import ActorBatch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(min_len, max_len, num_sequences).round().long().tolist()
    prompts, responses = [], []
    for n in lengths:
        prompt = max(1, n // 4)
        prompts.append(torch.randint(3, vocab, (prompt,), generator=g))
        responses.append(torch.randint(3, vocab, (n - prompt,), generator=g))
    return ActorBatch(prompt_ids=prompts, response_ids=responses, advantages=torch.randn(num_sequences, generator=g))


def _actor_rank(model_path, packing, batch_args, steps, warmup, max_tokens):
    from megatron_rl.actor.config import ActorConfig, OptimizerSettings
    from megatron_rl.actor.megatron_actor import MegatronActor

    actor = MegatronActor(ActorConfig(
        model_path=model_path, packing=packing, max_tokens_per_microbatch=max_tokens,
        optimizer=OptimizerSettings(lr=1e-6),
    )).setup()
    batch = _batch(*batch_args)
    batch.old_log_probs = [torch.zeros(r.numel()) for r in batch.response_ids]
    step_times, fwd_bwd_times, model_tokens = [], [], 0
    for step in range(warmup + steps):
        start = time.perf_counter()
        metrics = actor.train_step(batch)
        if step >= warmup:
            step_times.append(time.perf_counter() - start)
            fwd_bwd_times.append(metrics["fwd_bwd_seconds"])
            model_tokens = metrics["model_tokens"]
    actor.shutdown()
    return _result(step_times, fwd_bwd_times, sum(batch.sequence_lengths), model_tokens)


def _result(step_times, fwd_bwd_times, real_tokens, model_tokens):
    step, fwd_bwd = sum(step_times) / len(step_times), sum(fwd_bwd_times) / len(fwd_bwd_times)
    return {"step_seconds": step, "fwd_bwd_seconds": fwd_bwd, "real_tokens": real_tokens, "model_tokens": model_tokens,
            "fwd_bwd_tokens_per_s": real_tokens / fwd_bwd, "step_tokens_per_s": real_tokens / step}


def _pytorch_rank(model_path, batch_args, steps, warmup, max_tokens):
    """transformers forward/backward + AdamW; micro-batches of equal-length rows, token log-prob loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batch = _batch(*batch_args)
    seqs = [torch.cat([p, r]) for p, r in zip(batch.prompt_ids, batch.response_ids)]
    per_mb = max(1, max_tokens // max(s.numel() for s in seqs))
    step_times, fwd_bwd_times = [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        optim.zero_grad(set_to_none=True)
        for i in range(0, len(seqs), per_mb):
            ids = torch.stack(seqs[i : i + per_mb])
            logits = model(input_ids=ids).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            (-logp.mean()).backward()
        fwd_bwd = time.perf_counter() - start
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if step >= warmup:
            step_times.append(time.perf_counter() - start)
            fwd_bwd_times.append(fwd_bwd)
    real = sum(s.numel() for s in seqs)
    return _result(step_times, fwd_bwd_times, real, real)


def run_train_benchmarks(model_path: str, *, vocab: int, seq_len: int = 512, num_sequences: int = 8,
                         steps: int = 3, warmup: int = 1, threads: int | None = None) -> list[dict]:
    """Rows: name, seconds/step, real tokens/s, model tokens (incl. padding), ratio notes."""
    threads = threads or torch.get_num_threads()
    max_tokens = seq_len * 4
    uniform = (num_sequences, seq_len, seq_len, vocab, 0)
    spread = (num_sequences, max(2, seq_len // 10), seq_len, vocab, 0)
    runs = {
        "pytorch (transformers + AdamW), uniform": (_pytorch_rank, (model_path, uniform, steps, warmup, max_tokens)),
        "megatron actor, uniform": (_actor_rank, (model_path, True, uniform, steps, warmup, max_tokens)),
        "megatron actor, 10x spread, padded": (_actor_rank, (model_path, False, spread, steps, warmup, max_tokens)),
        "megatron actor, 10x spread, packed": (_actor_rank, (model_path, True, spread, steps, warmup, max_tokens)),
    }
    rows = []
    for name, (fn, args) in runs.items():
        result = spawn_ranks(fn, 1, args=args, threads_per_rank=threads, timeout=3600)[0]
        rows.append({"name": name, **result})
    return rows
