"""Record cleaning: a record's text field -> a document text, or the reason it is skipped.

Skip reasons (counted, logged, never fatal):
- `missing_field`: the record has no such field
- `wrong_type`: the value is not text (a number, list, dict, bool)
- `invalid_utf8`: bytes that are not UTF-8, or text with U+FFFD / lone surrogates (what undecodable
  bytes turn into when files are read with `errors="replace"`)
- `invalid_json`: a jsonl line that is not a JSON object
- `empty`: null, or only whitespace
- `too_short` / `too_long`: outside [`min_tokens`, `max_tokens`] once tokenised
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Optional

SKIP_REASONS = ("missing_field", "wrong_type", "invalid_utf8", "invalid_json", "empty", "too_short", "too_long")

_UNDECODABLE = re.compile("[\ufffd\ud800-\udfff]")


def clean_text(value: Any) -> tuple[Optional[str], Optional[str]]:
    """(text, None) for a usable document, else (None, reason)."""
    if value is None:
        return None, "empty"
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8"
    if not isinstance(value, str):
        return None, "wrong_type"
    if _UNDECODABLE.search(value):
        return None, "invalid_utf8"
    if not value.strip():
        return None, "empty"
    return value, None


class SkipCounter(Counter):
    """Skipped records by reason (a `collections.Counter` that prints only the non-zero reasons)."""

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.items()) if v}
