"""Resumable (tus) upload rows (the lock between PATCHes is :mod:`service.tus.locker`)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from .base import CatalogBase
from .schema import tus_uploads


class UploadRows(CatalogBase):
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
            tus_uploads.c.expires_at < self.now(), tus_uploads.c.completed_at.is_(None),
            # complete (the client was told so) and still owed a dataset: never expires
            sa.or_(tus_uploads.c.offset < tus_uploads.c.length,
                   tus_uploads.c.dataset_id.is_(None))))

    def complete_as(self, upload_id: str, dataset_id: str) -> None:
        """The upload's bytes are already the dataset ``dataset_id`` (a duplicate):
        completed, durably, before its bytes are released."""
        with self.durable_commit() as conn:
            conn.execute(tus_uploads.update().where(tus_uploads.c.id == upload_id)
                         .values(dataset_id=dataset_id, completed_at=self.now()))

    def committed_unreleased_tus_uploads(self) -> list[dict[str, Any]]:
        """Uploads whose dataset is committed but whose bytes are still kept (the
        process died between the commit and the release)."""
        return self._rows(sa.select(tus_uploads).where(
            tus_uploads.c.completed_at.isnot(None), tus_uploads.c.released_at.is_(None)))

    def complete_unfinished_tus_uploads(self) -> list[dict[str, Any]]:
        """Uploads that hold every byte but were never turned into a dataset (the end of
        their last PATCH failed: the catalog or store went away as it ended)."""
        return self._rows(sa.select(tus_uploads).where(
            tus_uploads.c.offset == tus_uploads.c.length,
            tus_uploads.c.completed_at.is_(None), tus_uploads.c.dataset_id.isnot(None)))

    def tus_expired(self, row: dict[str, Any]) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.literal(row["expires_at"]) < self.now())).scalar()
