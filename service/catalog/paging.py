"""Keyset pagination cursors: opaque to clients, tied to the sort they were issued for."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any


class CursorError(ValueError):
    """A pagination cursor that this catalog did not issue (or for another sort)."""


def encode_cursor(sort: str, value: Any, row_id: str) -> str:
    raw = json.dumps([sort, value, row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, sort: str) -> tuple[Any, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        cursor_sort, value, row_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise CursorError(f"cursor {cursor!r} is not one this service issued") from exc
    if cursor_sort != sort or not isinstance(row_id, str):
        raise CursorError(f"cursor was issued for sort={cursor_sort!r}, not sort={sort!r}")
    return value, row_id
