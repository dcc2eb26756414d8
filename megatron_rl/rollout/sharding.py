"""Split a batch of prompts over engines and put the engines' answers back together, exactly once each.

Pure Python (no Ray, no vLLM) so that the bookkeeping the fault tolerance relies on is unit-tested on its own:
- `split_prompts`: contiguous, near-equal shares; every prompt in exactly one share (all n samples of a prompt go to
  the same engine, so they share its prefix cache);
- `prompt_seed`: the per-prompt sampling seed depends only on (seed, prompt_index), never on which engine or attempt
  serves the prompt, so re-issued prompts and different pool sizes reproduce the same samples (vLLM then gives
  sample j of a prompt the seed prompt_seed + j, see vllm/v1/engine/parallel_sampling.py);
- `assemble_completions`: checks that every (prompt_index, sample_index) came back exactly once and orders them.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

from megatron_rl.rollout.types import Completion

_SEED_RANGE = 2**62  # vLLM seeds are Python ints; leave room for the "+ sample_index" of parallel sampling


class CompletionAccountingError(RuntimeError):
    """The engines' answers do not cover each (prompt_index, sample_index) exactly once."""


def split_prompts(num_prompts: int, num_shares: int) -> list[list[int]]:
    """Prompt indices in `num_shares` contiguous shares whose sizes differ by at most one (empty shares dropped)."""
    if num_prompts < 0 or num_shares < 1:
        raise ValueError(f"need num_prompts >= 0 and num_shares >= 1, got {num_prompts}, {num_shares}")
    base, extra = divmod(num_prompts, num_shares)
    shares, start = [], 0
    for i in range(num_shares):
        size = base + (1 if i < extra else 0)
        if size:
            shares.append(list(range(start, start + size)))
        start += size
    return shares


def prompt_seed(seed: int | None, prompt_index: int) -> int | None:
    """Sampling seed of one prompt: a hash of (seed, prompt_index); None (unseeded) stays None."""
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _SEED_RANGE


def assemble_completions(completions: Iterable[Completion], num_prompts: int, n: int) -> list[Completion]:
    """All completions ordered by (prompt_index, sample_index); raises if any is missing, duplicated or unknown."""
    by_key: dict[tuple[int, int], Completion] = {}
    for c in completions:
        key = (c.prompt_index, c.sample_index)
        if not (0 <= c.prompt_index < num_prompts and 0 <= c.sample_index < n):
            raise CompletionAccountingError(f"completion {key} is outside {num_prompts} prompts x {n} samples")
        if key in by_key:
            raise CompletionAccountingError(
                f"completion {key} came back twice (engines {by_key[key].engine_id} and {c.engine_id})"
            )
        by_key[key] = c
    missing = [(p, s) for p in range(num_prompts) for s in range(n) if (p, s) not in by_key]
    if missing:
        raise CompletionAccountingError(f"{len(missing)} completions never came back, first {missing[:5]}")
    return [by_key[(p, s)] for p in range(num_prompts) for s in range(n)]

