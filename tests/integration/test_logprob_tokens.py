"""rollout/logprob_tokens.py against the installed vLLM: log-prob processors are built without a tokenizer (no token
text), exactly as vLLM builds them for detokenize=False; the engines' numbers are covered by test_rollout_pool
(log-probs vs transformers, text, stop strings), which run with the patch on."""
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")


def test_logprob_processors_get_no_tokenizer_and_keep_their_settings():
    from vllm import SamplingParams
    from vllm.v1.engine.logprobs import LogprobsProcessor

    from megatron_rl.rollout.logprob_tokens import build_logprobs_without_token_text

    assert build_logprobs_without_token_text() and build_logprobs_without_token_text()  # idempotent
    request = SimpleNamespace(sampling_params=SamplingParams(logprobs=0, prompt_logprobs=None))
    processor = LogprobsProcessor.from_new_request(tokenizer=object(), request=request)
    assert processor.tokenizer is None
    assert processor.num_logprobs == 0 and processor.logprobs is not None and processor.cumulative_logprob == 0.0
    none = LogprobsProcessor.from_new_request(tokenizer=object(), request=SimpleNamespace(
        sampling_params=SamplingParams(logprobs=None)))
    assert none.logprobs is None  # requests without log-probs are as before
