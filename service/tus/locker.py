"""The per-upload lock that keeps two PATCHes of one upload apart, whichever replicas
they reach (tusd's locker). On PostgreSQL: a session advisory lock on a 64-bit hash of
the upload id, held on a connection of its own, so it also goes if its holder dies; on
the embedded SQLite catalog (one process): a set in memory."""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from ..catalog import Catalog


def lock_key(upload_id: str) -> int:
    """A signed 64-bit advisory-lock key for ``upload_id`` (PostgreSQL's bigint): two
    uploads share one with odds of 2^-64, not the 2^-32 of a CRC-32."""
    digest = hashlib.sha256(f"mrc-ingest-tus:{upload_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Locker:
    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self._local: set[str] = set()
        self._guard = threading.Lock()
        #: PostgreSQL: each held lock keeps a session open for a whole PATCH; they get
        #: connections of their own, never the catalog pool's (which the PATCH's own
        #: settles, leases and commits need)
        self._engine = sa.create_engine(catalog.engine.url, poolclass=NullPool,
                                        connect_args={"connect_timeout": 5,
                                                      "application_name": "mrc-ingest-tus"}) \
            if catalog.is_postgres else None

    def take(self, upload_id: str) -> Any | None:
        """Take the lock of one upload; None when another PATCH has it, on this replica
        or another. Give the handle back to :meth:`give_back`."""
        if not self.catalog.is_postgres:
            with self._guard:
                if upload_id in self._local:
                    return None
                self._local.add(upload_id)
            return upload_id
        key = lock_key(upload_id)
        assert self._engine is not None
        conn = self._engine.connect()
        try:
            taken = bool(conn.execute(sa.select(sa.func.pg_try_advisory_lock(key))).scalar())
            conn.commit()
        except BaseException:
            conn.close()
            raise
        if not taken:
            conn.close()
            return None
        return (conn, key)

    def give_back(self, handle: Any) -> None:
        if isinstance(handle, str):
            with self._guard:
                self._local.discard(handle)
            return
        conn, key = handle
        try:
            conn.execute(sa.select(sa.func.pg_advisory_unlock(key)))
            conn.commit()
        finally:
            conn.close()

    @contextmanager
    def hold(self, upload_id: str) -> Iterator[bool]:
        """:meth:`take` for a block: yields whether the lock was taken."""
        handle = self.take(upload_id)
        try:
            yield handle is not None
        finally:
            if handle is not None:
                self.give_back(handle)
