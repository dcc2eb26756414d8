"""Data that crosses the rollout boundary: what is asked of the engines and what comes back.

Kept free of vLLM/Ray imports so that rewards, evaluation, sampling and the trainer can use these types
(and tests can build them by hand) without starting an engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Completion:
    """One sampled response to one prompt.

    prompt_index: position of the prompt in the request list; sample_index: 0..n-1 within that prompt.
    logprobs[t] is the sampling policy's log-probability of token_ids[t] (same length as token_ids).
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

    @property
    def truncated(self) -> bool:
        """True when generation hit max_tokens instead of a stop token."""
        return self.finish_reason == "length"
