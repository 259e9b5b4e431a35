"""Keyset pagination cursors: opaque to clients, tied to the sort they were issued for."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import sqlalchemy as sa


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


def after_cursor(query: sa.Select, key: sa.ColumnElement, tie: sa.ColumnElement,
                 cursor: str | None, sort: str, descending: bool) -> sa.Select:
    """``query`` narrowed to the rows after ``cursor`` in (``key``, ``tie``) order. A
    cursor whose value is not of the sort column's kind (text, or a 64-bit integer) is
    one this service did not issue."""
    if not cursor:
        return query
    value, row_id = decode_cursor(cursor, sort)
    text = key.type.python_type is str
    if (text and not isinstance(value, str)) or (not text and (
            type(value) is not int or not -2**63 <= value < 2**63)) \
            or "\x00" in row_id or (text and "\x00" in value):
        raise CursorError(f"cursor {cursor!r} is not one this service issued")
    if descending:
        return query.where(sa.or_(key < value, sa.and_(key == value, tie < row_id)))
    return query.where(sa.or_(key > value, sa.and_(key == value, tie > row_id)))


def page_of(rows: list[dict[str, Any]], limit: int,
            sort: str) -> tuple[list[dict[str, Any]], str | None]:
    """The first ``limit`` of ``rows`` (read as ``limit + 1``) and the next page's cursor,
    None at the end."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode_cursor(sort, rows[-1][sort], rows[-1]["id"])
