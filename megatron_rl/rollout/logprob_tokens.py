"""Log-probs without the text of their tokens: the one change this project makes to vLLM's output processing.

Every completion asks vLLM for the sampled token's log-prob (`logprobs=0`). vLLM then also decodes the text of that
token at every position (`Logprob.decoded_token`: `convert_ids_list_to_tokens` plus a check against the context),
in Python, per token of every sample. Nothing here reads that text: completions carry the token ids, the float
log-probs and the response text, which vLLM's incremental detokenizer produces separately. So the engines build
their `LogprobsProcessor` without a tokenizer, exactly what vLLM itself does for a request with `detokenize=False`;
the response text is untouched.

Measured in one engine (tools/BENCHMARKS.md, "Rollout: log-prob token text"): 32 prompts x n=8 on the quickstart's
tiny model, 16% less time per generation round at 5 tokens per sample, 21% at 24; token ids, log-probs and text
identical. The cost is per generated token and the same on GPU, where it runs on the engine's CPU thread.
"""
from __future__ import annotations

import inspect
import logging

logger = logging.getLogger(__name__)

_MARK = "_megatron_rl_without_token_text"


def build_logprobs_without_token_text() -> bool:
    """Patch vLLM's `LogprobsProcessor.from_new_request` in this process (idempotent). Returns whether the patch is
    active; a vLLM whose signature differs keeps its own behaviour (and is logged), since this is only a speed-up."""
    from vllm.v1.engine.logprobs import LogprobsProcessor

    if getattr(LogprobsProcessor, _MARK, False):
        return True
    original = LogprobsProcessor.from_new_request.__func__
    if list(inspect.signature(original).parameters) != ["cls", "tokenizer", "request"]:
        logger.warning("vLLM's LogprobsProcessor.from_new_request%s is not the one this patch knows; log-prob tokens "
                       "keep their decoded text (slower, same numbers)", inspect.signature(original))
        return False

    def from_new_request(cls, tokenizer, request):
        return original(cls, None, request)  # None: as vLLM does for detokenize=False, for the log-probs only

    LogprobsProcessor.from_new_request = classmethod(from_new_request)
    setattr(LogprobsProcessor, _MARK, True)
    return True
