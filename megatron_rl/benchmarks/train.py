"""Training-step benchmarks of the Megatron actor: vs plain PyTorch, and packed (THD) vs padded (bshd) batches.

`train_rows(model_path, ...)` returns {"runs": rows, "ratios": rows}; `tools/benchmark.py train` prints them (and
`tools/benchmark.py gpu` runs the same measurement in bf16 on a GPU, `megatron_rl.benchmarks.gpu`).

Variants, all on the same HF checkpoint, one optimizer step over the whole batch each:
1. pytorch: `transformers` forward/backward + `torch.optim.AdamW`, micro-batches of equal-length rows, a per-token
   log-prob loss; on the uniform batch (every sequence `seq_len` tokens, nothing to pad).
2. actor vs pytorch: the Megatron actor's LUSPO train step (`MegatronActor.train_step`), packed and padded, on the
   same uniform batch: the ratio is the framework's cost (or gain) at equal work.
3. packed vs padded: the actor on RL-like batches whose lengths spread `s`x (prompt + response from seq_len/s to
   seq_len, evenly), once packed into one THD stream per micro-batch and once padded to each micro-batch's longest
   sequence. For s = 10 about 41-45% of the padded tokens are padding (50% as s grows; less when the micro-batch
   plan groups similar lengths), the case the packing target ("packed >= 1.5x faster when half the padded tokens
   are padding") refers to; s = 1 has no padding at all, so its packed/padded ratio is the cost of the THD code
   path itself (per-sequence attention, THD RoPE, index ops). `max_tokens` (tokens per micro-batch) sets how many
   sequences share one micro-batch: per-sequence costs of the THD path grow with that number.
Tokens/s count real tokens (prompt + response, no padding) in every variant.

Noise control for shared machines: every variant lives in ONE process (one Megatron actor whose batch layout is
switched between packed and padded, one HF model) and the variants run in turn, step after step, so background
load hits them alike; each variant's first step(s) are a warm-up; medians are reported. The actor reports the
forward+backward time separately (`fwd_bwd_seconds`) from the whole step (which adds the micro-batch building
and the optimizer step). On an oversubscribed CPU (load above the core count) multi-threaded elementwise ops
(AdamW's, norms) can slow down by 10-50x while their OpenMP threads wait for each other: use `threads=1` there.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch


def spread_lengths(num_sequences: int, seq_len: int, spread: float) -> list[int]:
    """`num_sequences` lengths evenly from seq_len/spread to seq_len (all seq_len when spread = 1)."""
    if spread < 1:
        raise ValueError(f"spread must be >= 1 (longest / shortest sequence), got {spread}")
    shortest = max(2, round(seq_len / spread))
    return torch.linspace(shortest, seq_len, num_sequences).round().long().tolist()


def make_batch(lengths: list[int], vocab: int, seed: int = 0):
    """An ActorBatch of random tokens with the given sequence lengths (a quarter prompt), advantages and old
    log-probs (zeros) set, as the LUSPO step needs them."""
    from megatron_rl.actor.batch import ActorBatch

    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for n in lengths:
        prompt = max(1, n // 4)
        prompts.append(torch.randint(3, vocab, (prompt,), generator=g))
        responses.append(torch.randint(3, vocab, (n - prompt,), generator=g))
    batch = ActorBatch(prompt_ids=prompts, response_ids=responses, advantages=torch.randn(len(lengths), generator=g))
    batch.old_log_probs = [torch.zeros(r.numel()) for r in batch.response_ids]
    return batch


class _PyTorchTrainer:
    """transformers forward/backward + AdamW on equal-length rows; micro-batches of at most `max_tokens`.
    bf16 is plain PyTorch mixed precision (fp32 parameters and AdamW, bf16 `torch.autocast`), the usual recipe and
    the closest to Megatron's bf16 (bf16 compute, fp32 main weights in the optimizer)."""

    def __init__(self, model_path: str, dtype: torch.dtype, device: str, max_tokens: int):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
        self.model.train()
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=1e-6)
        self.device, self.max_tokens = device, max_tokens
        self.autocast = dtype != torch.float32
        self.dtype = dtype

    def step(self, batch) -> dict[str, float]:
        seqs = [torch.cat([p, r]) for p, r in zip(batch.prompt_ids, batch.response_ids)]
        if len({s.numel() for s in seqs}) != 1:
            raise ValueError("the plain PyTorch baseline runs on equal-length sequences only (no padding logic)")
        per_mb = max(1, self.max_tokens // seqs[0].numel())
        _sync(self.device)
        start = time.perf_counter()
        self.optim.zero_grad(set_to_none=True)
        for i in range(0, len(seqs), per_mb):
            ids = torch.stack(seqs[i : i + per_mb]).to(self.device)
            with torch.autocast(self.device, dtype=self.dtype, enabled=self.autocast):
                logits = self.model(input_ids=ids).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            (-logp.mean()).backward()
        _sync(self.device)
        fwd_bwd = time.perf_counter() - start
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optim.step()
        _sync(self.device)
        return {"fwd_bwd_seconds": fwd_bwd, "step_seconds": time.perf_counter() - start,
                "model_tokens": float(sum(s.numel() for s in seqs))}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _actor_step(actor, batch, packing: bool, device: str) -> dict[str, float]:
    """One train step with the batch layout switched to `packing` (the only place the actor reads it is
    `_my_microbatches`, so both layouts share one model, optimizer and process)."""
    actor.config = dataclasses.replace(actor.config, packing=packing)
    _sync(device)
    start = time.perf_counter()
    metrics = actor.train_step(batch)
    _sync(device)
    return {"fwd_bwd_seconds": metrics["fwd_bwd_seconds"], "step_seconds": time.perf_counter() - start,
            "model_tokens": metrics["model_tokens"]}


def bench_rank(model_path: str, variants: list[dict], *, steps: int, warmup: int, max_tokens: int, dtype: str,
               device: str, vocab: int, profile_steps: int = 0) -> list[dict]:
    """Body of the benchmark process (an initialised torch.distributed world of one rank). Each variant is
    {"name", "kind": "pytorch" | "packed" | "padded", "lengths"}; returns per variant its per-step timings
    (and a torch.profiler table of `profile_steps` extra steps when asked)."""
    from megatron_rl.actor.config import ActorConfig, OptimizerSettings
    from megatron_rl.actor.megatron_actor import MegatronActor

    actor = MegatronActor(ActorConfig(
        model_path=model_path, packing=True, max_tokens_per_microbatch=max_tokens, dtype=dtype,
        optimizer=OptimizerSettings(lr=1e-6),
    )).setup()
    pytorch = None
    if any(v["kind"] == "pytorch" for v in variants):
        pytorch = _PyTorchTrainer(model_path, getattr(torch, dtype), device, max_tokens)
    batches = [make_batch(v["lengths"], vocab, seed=i) for i, v in enumerate(variants)]

    def run(i: int) -> dict[str, float]:
        kind = variants[i]["kind"]
        if kind == "pytorch":
            return pytorch.step(batches[i])
        return _actor_step(actor, batches[i], kind == "packed", device)

    timings: list[list[dict]] = [[] for _ in variants]
    for step in range(warmup + steps):
        for i in range(len(variants)):  # round-robin: background load hits every variant alike
            result = run(i)
            if step >= warmup:
                timings[i].append(result)
    profiles = [profile_table(lambda i=i: run(i), profile_steps) if profile_steps else None
                for i in range(len(variants))]
    actor.shutdown()
    return [{"timings": t, "profile": p} for t, p in zip(timings, profiles)]


def profile_table(fn, steps: int, row_limit: int = 25) -> str:
    """torch.profiler's table of the ops that take the most self CPU time over `steps` calls of fn."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=row_limit)


def default_variants(num_sequences: int, seq_len: int, spreads: tuple[float, ...], pytorch: bool = True) -> list[dict]:
    """pytorch on the uniform batch, then padded and packed actor steps per spread; spread 1 (the uniform batch,
    no padding) is always included: its packed row is also the actor row of the actor/pytorch comparison."""
    spreads = (1.0, *[s for s in spreads if s != 1])
    variants = []
    if pytorch:
        variants.append({"name": "pytorch (transformers + AdamW), 1x spread", "kind": "pytorch", "spread": 1.0,
                         "lengths": spread_lengths(num_sequences, seq_len, 1)})
    for spread in spreads:
        lengths = spread_lengths(num_sequences, seq_len, spread)
        for kind in ("padded", "packed"):
            variants.append({"name": f"actor {kind}, {spread:g}x spread", "kind": kind, "spread": spread,
                             "lengths": lengths})
    return variants


def summarize(variants: list[dict], results: list[dict]) -> dict[str, list[dict[str, Any]]]:
    """Per-variant timings ("runs") and the ratios the targets are stated in ("ratios"). Both the median and the
    minimum over the measured steps are given: on a machine with bursts of foreign load the minimum (the least
    disturbed step) is the better estimate of the intrinsic time, the median shows how typical it was."""
    runs = []
    for v, r in zip(variants, results):
        t = r["timings"]
        real = float(sum(v["lengths"]))
        model_tokens = t[-1]["model_tokens"]
        fwd_bwd = [x["fwd_bwd_seconds"] for x in t]
        step = [x["step_seconds"] for x in t]
        runs.append({
            "variant": v["name"], "sequences": len(v["lengths"]), "real_tokens": int(real),
            "model_tokens": int(model_tokens), "padding_frac": round(1 - real / model_tokens, 3),
            "fwd_bwd_s median": round(statistics.median(fwd_bwd), 4), "fwd_bwd_s min": round(min(fwd_bwd), 4),
            "step_s median": round(statistics.median(step), 4), "step_s min": round(min(step), 4),
            "fwd_bwd_tok_s (min time)": round(real / min(fwd_bwd)), "step_tok_s (min time)": round(real / min(step)),
            "fwd_bwd_s per step": ", ".join(f"{x:.3f}" for x in fwd_bwd),
        })
    ratios = []
    by_kind = {(v["kind"], v["spread"]): run for v, run in zip(variants, runs)}

    def ratio_row(comparison: str, ours: dict, ref: dict, padding: float) -> dict:
        """Speed of `ours` relative to `ref` on the same tokens: time(ref) / time(ours), > 1 = ours faster."""
        return {"comparison": comparison, "padding_frac": padding,
                **{f"{part} speed ratio ({stat})": round(ref[f"{part}_s {stat}"] / ours[f"{part}_s {stat}"], 3)
                   for part in ("fwd_bwd", "step") for stat in ("min", "median")}}

    if ("pytorch", 1) in by_kind:
        for kind in ("packed", "padded"):
            ratios.append(ratio_row(f"actor ({kind}) / plain PyTorch, 1x spread (target >= 0.8)",
                                    by_kind[(kind, 1)], by_kind[("pytorch", 1)], 0.0))
    for v in variants:
        if v["kind"] == "padded" and ("packed", v["spread"]) in by_kind:
            padded, packed = by_kind[("padded", v["spread"])], by_kind[("packed", v["spread"])]
            target = " (target >= 1.5)" if padded["padding_frac"] >= 0.4 else ""
            ratios.append(ratio_row(f"packed / padded, {v['spread']:g}x spread{target}", packed, padded,
                                    padded["padding_frac"]))
    return {"runs": runs, "ratios": ratios}


def train_rows(model_path: str, *, vocab: int, seq_len: int = 512, num_sequences: int = 8,
               spreads: tuple[float, ...] = (1, 2, 10), steps: int = 3, warmup: int = 1, threads: int | None = None,
               max_tokens: int | None = None, profile_steps: int = 0) -> dict[str, Any]:
    """CPU (gloo, fp32) measurement in one spawned process with `threads` torch threads (default: this process's).
    Returns {"runs": rows, "ratios": rows, "profiles": {variant name: profiler table}}."""
    from megatron_rl.parallel.spawn import spawn_ranks

    threads = threads or torch.get_num_threads()
    variants = default_variants(num_sequences, seq_len, spreads)
    results = spawn_ranks(
        bench_rank, 1, args=(model_path, variants),
        kwargs=dict(steps=steps, warmup=warmup, max_tokens=max_tokens or seq_len * 4, dtype="float32", device="cpu",
                    vocab=vocab, profile_steps=profile_steps),
        threads_per_rank=threads, timeout=3 * 3600,
    )[0]
    out = summarize(variants, results)
    out["profiles"] = {v["name"]: r["profile"] for v, r in zip(variants, results) if r["profile"]}
    return out
