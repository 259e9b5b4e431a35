"""Resumable (tus) upload rows, and the per-upload lock that keeps two PATCHes of one
upload apart, whichever replicas they reach."""

from __future__ import annotations

import threading
import zlib
from contextlib import contextmanager
from typing import Any, Iterator

import sqlalchemy as sa

from .base import CatalogBase
from .schema import tus_uploads


class UploadRows(CatalogBase):
    _local_locks: set[str]
    _local_guard: threading.Lock

    def add_tus_upload(self, **row: Any) -> dict[str, Any] | None:
        return self._insert(tus_uploads, {"created_at": self.now(), "pending_bytes": 0,
                                          **row})

    def get_tus_upload(self, upload_id: str) -> dict[str, Any] | None:
        return self._by_id(tus_uploads, upload_id)

    def update_tus_upload(self, upload_id: str, **fields: Any) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(tus_uploads.update().where(tus_uploads.c.id == upload_id)
                                .values(**fields)).rowcount > 0

    def delete_tus_upload(self, upload_id: str) -> None:
        self._delete(tus_uploads, upload_id)

    def tus_upload_of(self, dataset_id: str) -> dict[str, Any] | None:
        rows = self._rows(sa.select(tus_uploads).where(tus_uploads.c.dataset_id == dataset_id))
        return rows[0] if rows else None

    def expired_tus_uploads(self) -> list[dict[str, Any]]:
        """Unfinished uploads past their expiry (by the database's clock)."""
        return self._rows(sa.select(tus_uploads).where(
            tus_uploads.c.expires_at < self.now(), tus_uploads.c.completed_at.is_(None)))

    def complete_unfinished_tus_uploads(self) -> list[dict[str, Any]]:
        """Uploads that hold every byte but were never turned into a dataset (the end of
        their last PATCH failed: the catalog or store went away as it ended)."""
        return self._rows(sa.select(tus_uploads).where(
            tus_uploads.c.offset == tus_uploads.c.length,
            tus_uploads.c.completed_at.is_(None)))

    def tus_expired(self, row: dict[str, Any]) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.literal(row["expires_at"]) < self.now())).scalar()

    def lock_upload(self, upload_id: str) -> Any | None:
        """Take the lock of one upload (a PATCH holds it while it runs); None when
        another PATCH has it, on this replica or another. PostgreSQL: a session advisory
        lock on a hash of the id, held on a connection of its own, so it also goes if the
        holder dies. Give the handle back to :meth:`unlock_upload`."""
        if not self.is_postgres:
            with self._local_guard:
                if upload_id in self._local_locks:
                    return None
                self._local_locks.add(upload_id)
            return upload_id
        key = zlib.crc32(f"mrc-ingest-tus:{upload_id}".encode()) - 2**31
        conn = self.engine.connect()
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

    def unlock_upload(self, handle: Any) -> None:
        if isinstance(handle, str):
            with self._local_guard:
                self._local_locks.discard(handle)
            return
        conn, key = handle
        try:
            conn.execute(sa.select(sa.func.pg_advisory_unlock(key)))
            conn.commit()
        finally:
            conn.close()

    @contextmanager
    def upload_lock(self, upload_id: str) -> Iterator[bool]:
        """:meth:`lock_upload` for a block: yields whether the lock was taken."""
        handle = self.lock_upload(upload_id)
        try:
            yield handle is not None
        finally:
            if handle is not None:
                self.unlock_upload(handle)
