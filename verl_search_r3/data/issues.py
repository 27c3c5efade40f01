"""Bad-input reporting shared by every converter: one error type and a skip-with-warning log.

Row-level defects (a malformed JSON line, a missing field, an empty text, a duplicate id, bytes
that are not UTF-8, a judgement naming an unknown query or document) are *skipped with a
warning* and counted by reason; with ``strict=True`` the first one raises instead. Whole-input
defects (a missing file, a wrong header, an empty result) always raise :class:`DataFormatError`.
Every message starts with the place: ``file:line`` (text files) or ``file:row N`` (tables).
"""

from __future__ import annotations

import logging
from collections import Counter

__all__ = ["DataFormatError", "IssueLog", "SKIP_REASONS", "where"]

logger = logging.getLogger("verl_search_r3.data")

#: The reasons a row can be skipped for, as counted in the summary and the manifest.
SKIP_REASONS = {
    "invalid_json": "a line that is not a JSON object",
    "missing_field": "a required field (JSON key, TSV column, table column) is absent",
    "invalid_field": "a field of the wrong type, an id with a line break, or a grade that is not a whole number",
    "bad_encoding": "a field whose bytes are not valid UTF-8",
    "empty_text": "a document or query whose text is empty",
    "duplicate_id": "an id seen before (the first occurrence is kept)",
    "unknown_query": "a judgement or negative naming a query that was not read",
    "unknown_document": "a judgement or negative naming a document that is not in the corpus",
}


class DataFormatError(ValueError):
    """Malformed input; the message names the file, line (or row) and field."""


def where(path: str, line: int | None = None, row: bool = False) -> str:
    """The place prefix of a message: ``path:line``, ``path:row N`` or just ``path``."""
    if line is None:
        return path
    return f"{path}:row {line}" if row else f"{path}:{line}"


class IssueLog:
    """Collects skipped rows by reason; raises on the first one when ``strict``.

    Args:
        strict: turn every skip into a :class:`DataFormatError`.
        max_warnings: how many skip warnings to log per reason before going quiet (all are counted).
    """

    def __init__(self, strict: bool = False, max_warnings: int = 10):
        self.strict = strict
        self.max_warnings = max_warnings
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def skip(self, reason: str, message: str) -> None:
        """Record a skipped row (``message`` starts with the place); raise instead when strict."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        if self.strict:
            raise DataFormatError(f"{message} [{reason}; strict mode]")
        self.counts[reason] += 1
        self.examples.setdefault(reason, message)
        if self.counts[reason] <= self.max_warnings:
            logger.warning("skipped: %s", message)
            if self.counts[reason] == self.max_warnings:
                logger.warning("further %r warnings are counted but not shown", reason)

    @property
    def total(self) -> int:
        """Number of skipped rows over all reasons."""
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        """Skipped rows by reason, reasons in a fixed order."""
        return {r: self.counts[r] for r in SKIP_REASONS if self.counts[r]}
