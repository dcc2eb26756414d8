"""Rollout benchmarks: pool throughput vs a bare `vllm.LLM.generate`, and weight-sync time vs bytes moved.

Both functions return rows (dicts) for a table; `tools/bench_rollout.py` prints them.

Throughput (`throughput_rows`): the same prompts, sampling settings and per-prompt seeds (so the same tokens are
generated) on (a) a bare `vllm.LLM` in a fresh process with exactly the pool engine's settings
(`EngineConfig.llm_kwargs` / `process_env`), and (b) the pool. The two are measured alternately, repeat after
repeat, after one warm-up each, so that background load on a shared machine hits both alike; the median is
reported. The bare baseline is one engine with the settings of one pool engine: with one engine the ratio pool/bare
is the pool's overhead (Ray calls, sharding, building Completions); with k engines it is the data-parallel scaling
(at most k, and only if the machine has k x cpus_per_engine idle cores).

Weight sync (`weight_sync_rows`): `RolloutPool.update_weights` of a full model (every HF tensor, perturbed so the
engines really change) in buckets of a given size, against (a) a plain in-memory copy of the same bytes
(`dst.copy_(src)` per tensor into preallocated tensors, one process): the floor for moving those bytes once, and
(b) vLLM's own `worker.reload_weights` of the same tensors in one in-process engine (no Ray, no transport): the
floor set by vLLM's loading and weight processing, which every update pays.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from megatron_rl.rollout.config import EngineConfig, RolloutPoolConfig
from megatron_rl.rollout.types import SamplingConfig


def synthetic_prompts(num_prompts: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random token-id prompts (ids 3..vocab-1: the tiny tokenizer's special tokens are 0-2)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (num_prompts, prompt_len), generator=gen).tolist()


def _vocab_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return int(json.load(f)["vocab_size"])


# ---- bare vLLM in its own process ------------------------------------------------------------------------------
class BareLLM:
    """`vllm.LLM` with an EngineConfig's settings in a fresh process (its environment must precede `import vllm`).
    Protocol over stdin/stdout: one JSON request per line ({"prompts", "sampling"}) -> one JSON answer line."""

    def __init__(self, engine: EngineConfig):
        env = dict(os.environ, **engine.process_env("cpu"))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "megatron_rl.benchmarks.rollout", "--bare-server"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
        )
        self._send({"engine": _engine_to_json(engine)})

    def _send(self, message: dict) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the bare vLLM process exited with {self.process.wait()}")
            if line.startswith("{"):
                answer = json.loads(line)
                if "error" in answer:
                    raise RuntimeError(f"bare vLLM process: {answer['error']}")
                return answer

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> dict:
        """{"seconds", "tokens"} of one `LLM.generate` call."""
        return self._send({"prompts": prompts, "sampling": sampling.__dict__ | {"stop": list(sampling.stop)}})

    def reload_seconds(self, model_dir: str, offset: float) -> float:
        """Seconds of vLLM's own `worker.reload_weights` of the whole checkpoint (+ offset), tensors in memory."""
        return self._send({"reload": model_dir, "offset": offset})["seconds"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=120)


def _engine_to_json(engine: EngineConfig) -> dict:
    return {k: (dict(v) if k in ("env", "engine_kwargs") else v) for k, v in engine.__dict__.items()}


def _bare_server() -> None:
    """The child side of BareLLM (the environment is already set by the parent)."""
    from megatron_rl.rollout.engine import to_sampling_params
    from megatron_rl.rollout.sharding import prompt_seed

    llm = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if "engine" in request:
                from vllm import LLM

                engine = EngineConfig(**request["engine"])
                llm = LLM(**engine.llm_kwargs("cpu"))
                answer: dict[str, Any] = {"ready": True}
            elif "reload" in request:
                from safetensors.torch import load_file

                state = load_file(os.path.join(request["reload"], "model.safetensors"))
                weights = [(k, v + request["offset"]) for k, v in state.items()]
                start = time.perf_counter()
                llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
                answer = {"seconds": time.perf_counter() - start}
            else:
                sampling = SamplingConfig(**request["sampling"] | {"stop": tuple(request["sampling"]["stop"])})
                prompts = request["prompts"]
                params = [to_sampling_params(sampling, prompt_seed(sampling.seed, i)) for i in range(len(prompts))]
                start = time.perf_counter()
                outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
                seconds = time.perf_counter() - start
                tokens = sum(len(o.token_ids) for out in outputs for o in out.outputs)
                answer = {"seconds": seconds, "tokens": tokens}
        except Exception as e:  # noqa: BLE001 - reported to the parent
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)
    if llm is not None:
        llm.llm_engine.engine_core.shutdown()


# ---- throughput ------------------------------------------------------------------------------------------------
def throughput_rows(
    model_dir: str,
    *,
    engine_counts: tuple[int, ...] = (1, 2),
    cpus_per_engine: int = 1,
    num_prompts: int = 64,
    prompt_len: int = 32,
    n: int = 4,
    max_tokens: int = 128,
    repeats: int = 3,
    dtype: str = "float32",
) -> list[dict[str, Any]]:
    """One row per engine count: generated tokens/s of the pool, and of one bare LLM with the settings of one pool
    engine (so pool/bare is the overhead with 1 engine, and the scaling with k). Needs a running Ray cluster with
    at least max(engine_counts) * cpus_per_engine CPUs."""
    from megatron_rl.rollout.pool import RolloutPool

    prompts = synthetic_prompts(num_prompts, prompt_len, _vocab_size(model_dir))
    sampling = SamplingConfig(n=n, temperature=1.0, max_tokens=max_tokens, seed=0)
    engine = EngineConfig(
        model=model_dir, dtype=dtype, max_model_len=prompt_len + max_tokens + 8, cpus_per_engine=cpus_per_engine
    )
    rows = []
    bare = BareLLM(engine)
    try:
        bare.generate(prompts, sampling)  # warm-up
        for engines in engine_counts:
            pool = RolloutPool(RolloutPoolConfig(engine, num_engines=engines))
            try:
                pool.generate(prompts, sampling)  # warm-up
                bare_tps, pool_tps = [], []
                for _ in range(repeats):
                    b = bare.generate(prompts, sampling)
                    bare_tps.append(b["tokens"] / b["seconds"])
                    start = time.perf_counter()
                    completions = pool.generate(prompts, sampling)
                    pool_tps.append(sum(len(c.token_ids) for c in completions) / (time.perf_counter() - start))
            finally:
                pool.shutdown()
            bare_median, pool_median = statistics.median(bare_tps), statistics.median(pool_tps)
            rows.append({
                "engines": engines,
                "cpus_per_engine": cpus_per_engine,
                "requests": f"{num_prompts} x n={n}, {max_tokens} tok",
                "bare_tok_s": round(bare_median),
                "pool_tok_s": round(pool_median),
                "pool/bare": round(pool_median / bare_median, 3),
                "pool/bare per repeat": ", ".join(f"{p / b:.2f}" for p, b in zip(pool_tps, bare_tps)),
            })
    finally:
        bare.close()
    return rows


# ---- weight sync -----------------------------------------------------------------------------------------------
def _buckets(state: dict[str, torch.Tensor], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    buckets, bucket, size = [], [], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            buckets.append(bucket)
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    return buckets + ([bucket] if bucket else [])


def memcpy_seconds(state: dict[str, torch.Tensor], repeats: int = 10) -> float:
    """Fastest of `repeats` copies of every tensor into preallocated, already touched tensors (the floor)."""
    targets = {k: v.clone() for k, v in state.items()}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for k, v in state.items():
            targets[k].copy_(v)
        times.append(time.perf_counter() - start)
    return min(times)


def weight_sync_rows(
    model_dirs: list[str],
    *,
    engine_counts: tuple[int, ...] = (1, 2),
    bucket_sizes: tuple[int, ...] = (1 << 20, 64 << 20),
    repeats: int = 3,
    dtype: str = "float32",
) -> list[dict[str, Any]]:
    """One row per (model, engine count, bucket size): update_weights seconds vs a memcpy of the same bytes and vs
    vLLM's own reload in one in-process engine. Needs a running Ray cluster with at least max(engine_counts) CPUs."""
    from safetensors.torch import load_file

    from megatron_rl.rollout.pool import RolloutPool

    rows = []
    for model_dir in model_dirs:
        state = load_file(os.path.join(model_dir, "model.safetensors"))
        versions = [{k: v + 0.01 * (i + 1) for k, v in state.items()} for i in range(2)]  # real changes each time
        num_bytes = sum(v.numel() * v.element_size() for v in state.values())
        floor = memcpy_seconds(state)
        engine = EngineConfig(model=model_dir, dtype=dtype, max_model_len=256)
        bare = BareLLM(engine)
        try:
            reload_s = statistics.median(
                [bare.reload_seconds(model_dir, 0.01 * (r % 2 + 1)) for r in range(repeats + 1)][1:]
            )
        finally:
            bare.close()
        for engines in engine_counts:
            pool = RolloutPool(RolloutPoolConfig(engine, num_engines=engines))
            try:
                for bucket_bytes in bucket_sizes:
                    times, engine_times, num_buckets = [], [], 0
                    for r in range(repeats + 1):  # the first is a warm-up
                        stats = pool.update_weights(_buckets(versions[r % 2], bucket_bytes))
                        if r:
                            times.append(stats.seconds)
                            engine_times.append(max(stats.engine_seconds.values()))
                        num_buckets = stats.num_buckets
                    sync = statistics.median(times)
                    rows.append({
                        "model": os.path.basename(model_dir.rstrip("/")),
                        "tensors": len(state),
                        "MiB": round(num_bytes / 2**20, 1),
                        "engines": engines,
                        "bucket_MiB": round(bucket_bytes / 2**20, 1),
                        "buckets": num_buckets,
                        "sync_s": round(sync, 4),
                        "slowest_engine_s": round(statistics.median(engine_times), 4),
                        "sync_GiB_s": round(num_bytes / 2**30 / sync, 2),
                        "vllm_reload_s": round(reload_s, 4),
                        "memcpy_s": round(floor, 4),
                        "sync/vllm_reload": round(sync / reload_s, 1),
                        "sync/memcpy": round(sync / floor, 1),
                    })
            finally:
                pool.shutdown()
    return rows


if __name__ == "__main__":
    if sys.argv[1:] == ["--bare-server"]:
        _bare_server()
    else:
        sys.exit("internal entry point of BareLLM; run tools/bench_rollout.py")
