"""The catalog: datasets, jobs and uploads, behind this one package (SQLAlchemy Core).

SQLite is the embedded default (WAL, so readers never wait for the workers that write
progress); a ``postgresql+psycopg://`` URL runs the same catalog on PostgreSQL, shared by
any number of replicas. The schema is migrated with Alembic (:mod:`.migrate`); rows go
in and out as plain dicts; every time recorded comes from the database's clock.
"""

from __future__ import annotations

import sqlalchemy as sa

from .base import make_engine
from .clock import text_now as now
from .datasets import RARE_NAME_ROWS, CursorError, DatasetQuery, DatasetRows, escape_like
from .jobs import JobRows
from .refresher import SessionRefresher
from .sessions import SessionQuery, SessionRows, standout_frames
from .migrate import upgrade
from .schema import (DATASET_STATES, JOB_STATES, LIVE_STATUSES, SORT_KEYS, TOMBSTONE,
                     UNFINISHED_JOB_STATES, Fence, conversions, datasets, jobs, metadata,
                     particle_sets, sessions, sidecars, tus_uploads)
from .uploads import UploadRows

__all__ = ["Catalog", "CursorError", "DATASET_STATES", "DatasetQuery", "Fence", "JOB_STATES",
           "TOMBSTONE",
           "LIVE_STATUSES", "RARE_NAME_ROWS", "SORT_KEYS", "UNFINISHED_JOB_STATES",
           "conversions", "datasets", "escape_like", "jobs", "metadata", "now",
           "particle_sets", "sessions", "sidecars", "tus_uploads", "SessionQuery",
           "standout_frames"]


class Catalog(SessionRows, DatasetRows, JobRows, UploadRows):
    """Thread-safe: every call takes its own connection from the engine's pool, so
    routes (thread pool) and workers can call it concurrently."""

    def __init__(self, url: str, *, migrate: bool = True, pool_size: int = 10,
                 session_refresh_seconds: float = 0.0):
        super().__init__(make_engine(url, pool_size))
        self.url = url
        #: recomputes session figures after changes (:mod:`.refresher`; 0: each time)
        self.session_figures = SessionRefresher(self.refresh_session,
                                                session_refresh_seconds)
        if migrate:
            upgrade(self.engine)
        if self.dialect == "sqlite":
            with self.engine.connect() as conn:
                self.name_index = conn.exec_driver_sql(
                    "SELECT 1 FROM sqlite_master WHERE name = 'datasets_name'").first() \
                    is not None

    @property
    def database(self) -> str:
        """The URL without its password, for logs and /healthz."""
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)
