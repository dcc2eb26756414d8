"""Check one dataset row and turn it into a :class:`PromptRecord` (or say exactly what is wrong with it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_rl.data.config import PromptDataConfig
from megatron_rl.data.errors import DataError, RowIssue

Message = dict[str, str]


@dataclass(frozen=True)
class PromptRecord:
    """A valid row: the prompt as chat messages, the ground truth as a string, and the row's metadata."""

    row: int
    messages: list[Message]
    ground_truth: str
    data_source: str = ""
    extra_info: dict[str, Any] = field(default_factory=dict)


def required_columns(config: PromptDataConfig) -> list[str]:
    """Top-level columns the file must have (a dotted key needs its first part)."""
    return [config.resolved_prompt_key.split(".")[0], config.resolved_ground_truth_key.split(".")[0]]


def check_columns(column_names: list[str], config: PromptDataConfig, where: str, key: str = "data") -> None:
    missing = [c for c in required_columns(config) if c not in column_names]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing} for {key}.layout={config.layout!r}; the file has columns "
            f"{column_names}. Set {key}.prompt_key / {key}.ground_truth_key to the right names, or {key}.layout"
        )


def _lookup(row: dict[str, Any], dotted_key: str) -> tuple[Any, str | None]:
    """(value, None) or (None, reason) for a dotted key such as "reward_model.ground_truth"."""
    value: Any = row
    for depth, part in enumerate(dotted_key.split(".")):
        if not isinstance(value, dict):
            where = ".".join(dotted_key.split(".")[:depth]) or "row"
            return None, f"{where!r} is {type(value).__name__}, expected a struct/dict with field {part!r}"
        if value.get(part) is None:
            return None, f"missing (field {part!r} is absent or null)"
        value = value[part]
    return value, None


def _messages(value: Any, config: PromptDataConfig) -> tuple[list[Message] | None, str | None]:
    if config.layout == "simple":
        if not isinstance(value, str):
            return None, f"expected a text prompt (str), got {type(value).__name__}"
        if not value.strip():
            return None, "empty prompt"
        return [{"role": "user", "content": config.prompt_template.replace("{prompt}", value)}], None
    if not isinstance(value, (list, tuple)) or not value:
        shown = "an empty list" if isinstance(value, (list, tuple)) else type(value).__name__
        return None, f"expected a non-empty list of chat messages {{role, content}}, got {shown}"
    messages = []
    for position, message in enumerate(value):
        if not isinstance(message, dict):
            return None, f"message {position} is {type(message).__name__}, expected {{role, content}}"
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            return None, f"message {position} has no role"
        if not isinstance(content, str):
            return None, f"message {position} content is {type(content).__name__}, expected str"
        messages.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in messages):
        return None, "empty prompt (every message content is blank)"
    return messages, None


def _ground_truth(value: Any) -> tuple[str | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None, f"expected a string or number, got {type(value).__name__}"
    text = value if isinstance(value, str) else repr(value)
    if not text.strip():
        return None, "empty ground truth"
    return text.strip(), None


def parse_row(row: dict[str, Any], index: int, config: PromptDataConfig) -> PromptRecord | RowIssue:
    prompt_key, truth_key = config.resolved_prompt_key, config.resolved_ground_truth_key
    value, problem = _lookup(row, prompt_key)
    messages, problem = (None, problem) if problem else _messages(value, config)
    if problem:
        return RowIssue(index, prompt_key, problem)
    value, problem = _lookup(row, truth_key)
    ground_truth, problem = (None, problem) if problem else _ground_truth(value)
    if problem:
        return RowIssue(index, truth_key, problem)
    if config.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": config.system_prompt}] + messages
    data_source = row.get("data_source")
    if data_source is not None and not isinstance(data_source, str):
        return RowIssue(index, "data_source", f"expected str, got {type(data_source).__name__}")
    extra_info = row.get("extra_info")
    if extra_info is not None and not isinstance(extra_info, dict):
        return RowIssue(index, "extra_info", f"expected a struct/dict, got {type(extra_info).__name__}")
    return PromptRecord(index, messages, ground_truth, data_source or config.data_source, dict(extra_info or {}))
