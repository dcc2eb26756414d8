"""Settings of a prompt dataset (one typed block of the trainer's config tree)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_rl.errors import require

Layout = Literal["dapo", "simple"]
OnProblem = Literal["error", "skip"]


@dataclass
class PromptDataConfig:
    """Where the prompts are and how to read them.

    path: a .parquet, .jsonl or .json file, or a list of them (one format), read with ``datasets``.
    layout: "dapo" -- the DAPO-Math-17k / AIME-2024 layout: ``prompt`` is a list of chat messages
      {role, content}, the ground truth is ``reward_model.ground_truth``, optional ``data_source``, ``ability``,
      ``extra_info`` columns; "simple" -- a text prompt column and an answer column.
    prompt_key / ground_truth_key: column names; None means the layout's default ("prompt" and
      "reward_model.ground_truth" for dapo, "prompt" and "answer" for simple). A dotted key reads a struct field.
    data_source: used when the file has no ``data_source`` column (it selects the verifier of the "default"
      reward: "synthetic/<task>" for a synthetic task -- arithmetic, countdown, chain --, anything else is math).
    max_prompt_len: prompts longer than this many tokens (after the chat template) are an error, or are
      skipped and reported with on_overlong="skip". None: no limit.
    on_invalid: rows with a missing/empty prompt or ground truth or a malformed message list: "error" (default,
      all problems listed) or "skip" (counted and listed in the dataset report and the log).
    apply_chat_template: render prompts with ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``;
      False tokenizes the raw text (the simple layout's text, or a dapo prompt's message contents joined).
    system_prompt: prepended as a system message when the prompt has none.
    prompt_template: simple layout only; "{prompt}" is replaced by the row's text (other braces are literal,
      e.g. "{prompt} Put the final answer in \\boxed{}.").
    max_examples: read only the first N rows (a quick evaluation subset).
    cache_dir: ``datasets`` cache directory (default: its own).
    """

    path: str | list[str] = ""
    layout: Layout = "dapo"
    prompt_key: str | None = None
    ground_truth_key: str | None = None
    data_source: str = ""
    max_prompt_len: int | None = None
    on_invalid: OnProblem = "error"
    on_overlong: OnProblem = "error"
    apply_chat_template: bool = True
    system_prompt: str | None = None
    prompt_template: str = "{prompt}"
    max_examples: int | None = None
    cache_dir: str | None = None

    def __post_init__(self):
        def need(cond: bool, field: str, problem: str) -> None:
            require(cond, field, problem, "data")

        need(bool(self.path), "path", "is required: a .parquet/.jsonl/.json file or a list of them")
        need(self.layout in ("dapo", "simple"), "layout", f"must be 'dapo' or 'simple', got {self.layout!r}")
        for name in ("on_invalid", "on_overlong"):
            need(getattr(self, name) in ("error", "skip"), name, f"must be 'error' or 'skip', got {getattr(self, name)!r}")
        need(self.max_prompt_len is None or self.max_prompt_len >= 1, "max_prompt_len",
             f"must be >= 1 or null, got {self.max_prompt_len}")
        need(self.max_examples is None or self.max_examples >= 1, "max_examples",
             f"must be >= 1 or null, got {self.max_examples}")
        need("{prompt}" in self.prompt_template, "prompt_template",
             f"must contain '{{prompt}}', got {self.prompt_template!r}")
        need(self.layout != "dapo" or self.prompt_template == "{prompt}", "prompt_template",
             "applies to the simple layout only; a dapo prompt is already a list of chat messages (use "
             "system_prompt, or rewrite the file)")

    @property
    def resolved_prompt_key(self) -> str:
        return self.prompt_key or "prompt"

    @property
    def resolved_ground_truth_key(self) -> str:
        if self.ground_truth_key:
            return self.ground_truth_key
        return "reward_model.ground_truth" if self.layout == "dapo" else "answer"
