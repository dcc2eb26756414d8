"""Data problems: one exception type, and the per-row issue record used for both errors and skip reports."""
from __future__ import annotations

from dataclasses import dataclass

# How many row issues an error message or a log line lists (the report keeps all of them).
MAX_LISTED_ISSUES = 10


class DataError(ValueError):
    """The data cannot be used as configured: the message names the file, the rows/columns and the fix."""


@dataclass(frozen=True)
class RowIssue:
    """Row ``row`` (0-based, in file order) cannot be used because of ``column``: ``reason``.
    kind: "invalid" (malformed/missing/empty) or "overlong" (prompt longer than data.max_prompt_len)."""

    row: int
    column: str
    reason: str
    kind: str = "invalid"

    def __str__(self) -> str:
        return f"row {self.row}, column {self.column!r}: {self.reason}"


def list_issues(issues: list[RowIssue]) -> str:
    listed = "; ".join(str(issue) for issue in issues[:MAX_LISTED_ISSUES])
    more = len(issues) - MAX_LISTED_ISSUES
    return listed + (f"; ... and {more} more" if more > 0 else "")
