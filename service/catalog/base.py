"""The catalog's engine and the row helpers every part of it uses."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .clock import db_now


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL: a commit survives a crash of the process, not a power loss. The commit
    # protocol's own transaction switches its connection to FULL (durable_commit), which
    # syncs the WAL and with it every commit before: the received bytes, released right
    # after it, are never the only copy (ARCHITECTURE.md). Everything else (progress,
    # leases) costs no fsync.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def json_text(value: Any) -> str:
    """A JSON column's text, the same on both databases: NaN and infinities (a header's
    cell of NaN, the statistics of data holding NaN) are written as null. JSON has no
    such numbers: PostgreSQL refuses them, and SQLite would keep text no strict reader
    takes."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:  # rare: only then is the value walked
        return json.dumps(_finite(value), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def make_engine(url: str, pool_size: int = 10) -> Engine:
    """SQLite (embedded, WAL) or PostgreSQL through psycopg 3 with a connection pool
    that checks a connection before handing it out, so a restarted database is
    reconnected to instead of failing the next request."""
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, json_serializer=json_text,
                                  connect_args={"check_same_thread": False, "timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, json_serializer=json_text,
                            pool_size=pool_size, max_overflow=2 * pool_size,
                            pool_pre_ping=True, pool_recycle=1800, pool_timeout=10,
                            connect_args={"connect_timeout": 5,
                                          "application_name": "mrc-ingest"})


class CatalogBase:
    """Engine, dialect and the generic row operations."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.dialect = engine.dialect.name
        self.is_postgres = self.dialect == "postgresql"

    def now(self, plus_seconds: float | None = None) -> sa.ColumnElement[str]:
        """The database's time, as catalog text (see :mod:`.clock`)."""
        return db_now(self.dialect, plus_seconds)

    @contextmanager
    def durable_commit(self) -> Iterator[sa.Connection]:
        """A transaction whose commit is durable across a power loss, not only a crash:
        on SQLite the connection runs ``synchronous=FULL`` for it (the WAL is synced at
        its commit); PostgreSQL's commits are durable as configured (fsync on)."""
        if self.is_postgres:
            with self.engine.begin() as conn:
                # whatever the server's default, this commit waits for its WAL flush
                conn.exec_driver_sql("SET LOCAL synchronous_commit = on")
                yield conn
            return
        with self.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA synchronous=FULL")
            conn.commit()  # the PRAGMA autobegan a transaction: end it, then ours
            try:
                with conn.begin():
                    yield conn
            finally:
                conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
                conn.commit()

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(1)).scalar() == 1

    def _insert(self, table: sa.Table, row: dict[str, Any]) -> dict[str, Any] | None:
        with self.engine.begin() as conn:
            conn.execute(table.insert().values(**row))
        return self._by_id(table, row["id"])

    def _delete(self, table: sa.Table, row_id: str) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(table.delete().where(table.c.id == row_id)).rowcount > 0

    def _by_id(self, table: sa.Table, row_id: str,
               columns: list[sa.Column] | None = None) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(*(columns or [table]))
                               .where(table.c.id == row_id)).first()
        return dict(row._mapping) if row else None

    def _count(self, table: sa.Table, *conditions: sa.ColumnElement[bool]) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)
                                    .where(*conditions)).scalar())

    def _rows(self, query: sa.Select) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
