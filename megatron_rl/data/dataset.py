"""A prompt dataset: every row read, checked, rendered with the chat template and tokenized up front.

    dataset = build_prompt_dataset(PromptDataConfig(path="dapo-math-17k.parquet", max_prompt_len=1024), tokenizer)
    dataset[i].prompt_token_ids, dataset[i].ground_truth, dataset.report.skipped

Every problem is found here, before any GPU work: an error names the file, rows and columns (all of them, up
to a listing limit) and the setting that would skip them; skipped rows are counted and listed in
``dataset.report`` and logged -- never dropped silently.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from megatron_rl.data.config import PromptDataConfig
from megatron_rl.data.errors import DataError, RowIssue, list_issues
from megatron_rl.data.loading import load_table
from megatron_rl.data.rows import PromptRecord, check_columns, parse_row, required_columns
from megatron_rl.data.templates import render_prompt, tokenize_prompts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptExample:
    """One usable prompt. ``row`` is its 0-based row in the source file(s); ``prompt_text`` the rendered prompt."""

    row: int
    prompt_token_ids: list[int]
    prompt_text: str
    messages: list[dict[str, str]]
    ground_truth: str
    data_source: str = ""
    extra_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataReport:
    """What happened to the rows of the file: how many were read and kept, and every skipped row with why."""

    path: str
    num_rows: int
    num_examples: int = 0
    skipped: list[RowIssue] = field(default_factory=list)

    def summary(self) -> str:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(Counter(i.kind for i in self.skipped).items()))
        return (f"{self.path}: kept {self.num_examples} of {self.num_rows} rows"
                + (f"; skipped {len(self.skipped)} ({counts}): {list_issues(self.skipped)}" if self.skipped else ""))


class PromptDataset:
    """The examples (indexable, in file order) and the report of what was skipped."""

    def __init__(self, examples: list[PromptExample], report: DataReport):
        self.examples = examples
        self.report = report

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> PromptExample:
        return self.examples[index]

    def __iter__(self):
        return iter(self.examples)

    def select(self, indices: list[int]) -> list[PromptExample]:
        return [self.examples[i] for i in indices]


def _apply_policy(issues: list[RowIssue], policy: str, setting: str, what: str, where: str) -> None:
    if issues and policy == "error":
        raise DataError(f"{where}: {len(issues)} {what}: {list_issues(issues)}. Fix the data, or set "
                        f"{setting}=skip to skip them (they are then counted and listed in the report)")


def build_prompt_dataset(config: PromptDataConfig, tokenizer: Any, *, key: str = "data") -> PromptDataset:
    """Read ``config.path``, validate every row, render and tokenize the prompts; see the module docstring.
    key: the config key of this dataset, which error messages name ("data.train", "data.val")."""
    where = str(config.path)
    table = load_table(config.path, config.cache_dir, key=key)
    check_columns(list(table.column_names), config, where, key=key)
    if config.max_examples is not None:
        table = table.select(range(min(config.max_examples, len(table))))
    wanted = [c for c in dict.fromkeys(required_columns(config) + ["data_source", "extra_info"])
              if c in table.column_names]
    parsed = [parse_row(row, index, config) for index, row in enumerate(table.select_columns(wanted))]
    records = [item for item in parsed if isinstance(item, PromptRecord)]
    invalid = [item for item in parsed if isinstance(item, RowIssue)]
    _apply_policy(invalid, config.on_invalid, f"{key}.on_invalid", "invalid rows", where)

    texts = [render_prompt(tokenizer, r.messages, config.apply_chat_template) for r in records]
    token_ids = tokenize_prompts(tokenizer, texts, config.apply_chat_template)
    overlong = [RowIssue(r.row, config.resolved_prompt_key, f"prompt is {len(ids)} tokens, longer than "
                         f"{key}.max_prompt_len={config.max_prompt_len}", kind="overlong")
                for r, ids in zip(records, token_ids)
                if config.max_prompt_len is not None and len(ids) > config.max_prompt_len]
    _apply_policy(overlong, config.on_overlong, f"{key}.on_overlong", "over-long prompts", where)

    too_long = {issue.row for issue in overlong}
    examples = [PromptExample(r.row, ids, text, r.messages, r.ground_truth, r.data_source, r.extra_info)
                for r, ids, text in zip(records, token_ids, texts) if r.row not in too_long]
    skipped = sorted(invalid + overlong, key=lambda issue: issue.row)
    report = DataReport(where, num_rows=len(table), num_examples=len(examples), skipped=skipped)
    if skipped:
        logger.warning("data: %s", report.summary())
    if not examples:
        raise DataError(f"{where}: no usable prompts. {report.summary()}")
    return PromptDataset(examples, report)
