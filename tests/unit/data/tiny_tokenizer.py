"""A tiny offline byte-level BPE tokenizer with a ChatML chat template, for tests (no hub access)."""
from __future__ import annotations

import functools

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAINING_LINES = [
    "What is 3+4? Answer: 7", "Use 3, 5, 2 once each with + - * / to make 16.", "system user assistant",
    "The answer is \\boxed{\\frac{1}{2}}", "Solve the problem step by step. Remember to put your answer on its own "
    "line after \"Answer:\"", "Find the number of ordered pairs of integers",
]


@functools.lru_cache(maxsize=None)
def make_tiny_tokenizer(vocab_size: int = 400):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, ~vocab_size tokens) whose eos is <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TRAINING_LINES, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML_TEMPLATE)
