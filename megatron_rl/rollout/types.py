"""Data that crosses the rollout boundary: what is asked of the engines and what comes back.

Kept free of vLLM/Ray imports so that rewards, evaluation, sampling and the trainer can use these types
(and tests can build them by hand) without starting an engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_rl.errors import require

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingConfig:
    """Per-request sampling settings (mirrors the subset of vllm.SamplingParams we use)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        def need(cond: bool, field: str, problem: str) -> None:
            require(cond, field, problem, "sampling")

        need(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        need(0 <= self.temperature < math.inf, "temperature",  # also refuses NaN
             f"must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        need(self.top_k in (-1, 0) or self.top_k >= 1, "top_k", f"must be -1 or 0 (no top-k) or >= 1, got {self.top_k}")
        need(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        # tuple("</answer>") would stop at any of its characters
        need(not isinstance(self.stop, str), "stop",
             f"must be a tuple of strings, got the string {self.stop!r}; write stop=({self.stop!r},)")
        stop = tuple(self.stop)
        need(all(isinstance(s, str) and s for s in stop), "stop", f"must hold non-empty strings, got {stop!r}")
        object.__setattr__(self, "stop", stop)  # a list (e.g. from Python code) becomes the tuple the type says


@dataclass
class Completion:
    """One sampled response to one prompt.

    prompt_index: position of the prompt in the request list; sample_index: 0..n-1 within that prompt.
    logprobs[t] is the sampling policy's log-probability of token_ids[t] (same length as token_ids); what "the
    sampling policy" means is the engine's `logprobs_mode` (see megatron_rl/rollout/config.py: by default after
    temperature / top-k / top-p).
    finish_reason: "stop" (an end-of-sequence token or a stop string; the stop tokens are in token_ids),
    "length" (max_tokens reached) or "abort".
    engine_id: the engine that produced it; weights_version: the pool's weights version it was generated with
    (every completion of one `generate` call has the same); routed_experts (engines with return_routed_experts):
    the experts each token of prompt + response except the last was routed to, per MoE layer in layer order, a numpy
    array [tokens, MoE layers, top-k], uint8 when the model has <= 256 experts; timings: seconds, e.g. "engine_generate_s" (the wall time of the engine
    call that produced it, shared by that call's batch) and "pool_generate_s" (the whole pool call).
    """

    prompt_index: int
    sample_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: FinishReason
    engine_id: int = -1
    timings: dict[str, float] = field(default_factory=dict)
    weights_version: int = 0  # the pool's weights version that generated it (0: the checkpoint it started from)
    routed_experts: Any = None  # MoE: [prompt + response - 1 tokens, MoE layers, top-k] uint8/int16 array, or None

    @property
    def truncated(self) -> bool:
        """True when generation hit max_tokens instead of a stop token."""
        return self.finish_reason == "length"


@dataclass
class WeightSyncStats:
    """What one `RolloutPool.update_weights` call moved and how long it took.

    seconds: wall time of the whole call, including pulling the buckets from the caller's iterator (so the
        trainer's export is in it when the iterator is `export_hf_weights`); num_bytes: sum of the tensors' sizes,
        sent once into the transport whatever the number of engines; engine_seconds: each engine's time from the
        start of its update to its finish (receive + load + finalize + prefix-cache reset).
    """

    version: int
    num_buckets: int
    num_tensors: int
    num_bytes: int
    seconds: float
    engine_seconds: dict[int, float] = field(default_factory=dict)
    restarted_engines: list[int] = field(default_factory=list)


@dataclass
class PoolStats:
    """Health counters of a rollout pool since it started."""

    restarts: int = 0  # engines replaced (died, hung or failed to answer)
    timeouts: int = 0  # shares of a generate call that exceeded request_timeout_s
    engine_failures: int = 0  # engine deaths / engine-core crashes seen
    reissued_shares: int = 0  # shares of prompts sent again after a failure
    sleeps: int = 0  # colocated memory hand-offs to the actors (RolloutPool.sleep calls)
    wakes: int = 0  # RolloutPool.wake_up calls (one hand-off back is 1 or 2 of them: weights, then kv_cache)
    vllm_sleep_calls: int = 0  # engine sleeps that reached vLLM (0 on CPU, where vLLM has no sleep mode)
