"""Prompt text and token ids from chat messages, using the tokenizer's own chat template."""
from __future__ import annotations

from typing import Any, Sequence

from megatron_rl.data.errors import DataError

Message = dict[str, str]


def render_prompt(tokenizer: Any, messages: Sequence[Message], apply_chat_template: bool = True) -> str:
    """The text the model sees before its response.

    With the chat template: ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` (ends with
    the assistant header). Without: the message contents joined by blank lines.
    """
    if not apply_chat_template:
        return "\n\n".join(m["content"] for m in messages)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the tokenizer ({getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}) has no "
                        f"chat_template; use an instruct/chat tokenizer or set data.apply_chat_template=false")
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def tokenize_prompts(tokenizer: Any, texts: list[str], apply_chat_template: bool = True) -> list[list[int]]:
    """Token ids of rendered prompts. A chat template already writes every special token, so the tokenizer adds
    none; raw text gets the tokenizer's usual special tokens (e.g. a BOS)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=not apply_chat_template)["input_ids"]]


def render_sft_example(tokenizer: Any, messages: Sequence[Message], response: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) of a supervised warm-up example, both from the chat template.

    The whole conversation (prompt + assistant ``response``) is rendered by the template, so the response ids
    end with whatever the template closes an assistant turn with (``<|im_end|>`` in ChatML) -- the model learns
    to stop. The prompt rendering must be a prefix of the full rendering; templates that rewrite history
    (e.g. strip a thinking block from the last turn) fail that check with a DataError.
    """
    prompt_ids = tokenize_prompts(tokenizer, [render_prompt(tokenizer, messages)])[0]
    conversation = list(messages) + [{"role": "assistant", "content": response}]
    full_text = tokenizer.apply_chat_template(conversation, add_generation_prompt=False, tokenize=False)
    full_ids = tokenize_prompts(tokenizer, [full_text])[0]
    if full_ids[:len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
        raise DataError("the chat template does not render the prompt as a prefix of prompt + response, so the "
                        "response tokens cannot be separated; use a template that appends the assistant turn")
    return prompt_ids, full_ids[len(prompt_ids):]
