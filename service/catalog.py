"""The catalog: datasets and jobs, behind this one module (SQLAlchemy Core).

SQLite is the embedded default (WAL, so readers never wait for the worker threads that
write progress); any SQLAlchemy URL works, so a PostgreSQL backend needs no change in
the routers or the pipeline. Rows go in and out as plain dicts; the JSON column ``info``
holds what only the detail view needs (header, findings, stats, files, timings), the
other columns are what lists filter and sort on.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Engine

metadata = sa.MetaData()

datasets = sa.Table(
    "datasets", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),       # upload | registration
    sa.Column("status", sa.String(16), nullable=False),       # see DATASET_STATES
    sa.Column("created_at", sa.String(32), nullable=False),   # ISO 8601 UTC, sortable text
    sa.Column("updated_at", sa.String(32), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),   # the file as received
    sa.Column("sha256", sa.String(64)),
    sa.Column("path", sa.Text, nullable=False),               # the file as received
    sa.Column("mode", sa.Integer),
    sa.Column("nx", sa.Integer),
    sa.Column("ny", sa.Integer),
    sa.Column("nz", sa.Integer),
    sa.Column("dtype", sa.String(32)),
    sa.Column("pixel_size", sa.Float),                        # Å, X axis
    sa.Column("stored_bytes", sa.BigInteger),                 # archive copy, if any
    sa.Column("voltage_kv", sa.Float),                        # from sidecars / ext. header
    sa.Column("total_dose", sa.Float),                        # e-/Å², all images
    sa.Column("exposure_s", sa.Float),                        # whole movie, seconds
    sa.Column("magnification", sa.Float),
    sa.Column("camera", sa.String(64)),
    sa.Column("frame_stats", sa.JSON),                        # per frame mean/std/min/max
    sa.Column("progress", sa.JSON),                           # while in flight, else null
    sa.Column("info", sa.JSON, nullable=False, default=dict),
)
# Newest-first listing under any one or two equality filters walks one index in order.
for cols in (("created_at", "id"), ("status", "created_at", "id"), ("mode", "created_at", "id"),
             ("source", "created_at", "id"), ("status", "mode", "created_at", "id"),
             ("status", "source", "created_at", "id"), ("mode", "source", "created_at", "id"),
             ("name", "id"), ("size_bytes", "id"), ("sha256",),
             ("voltage_kv", "created_at", "id"), ("total_dose",), ("camera", "created_at", "id"),
             ("pixel_size",), ("exposure_s",), ("nz",)):
    sa.Index(f"ix_datasets_{'_'.join(cols)}", *(datasets.c[c] for c in cols))

#: SerialEM .mdoc / Direct Electron info.txt files, attached to their movie's dataset
#: (dataset_id) or waiting for it to arrive (dataset_id NULL).
sidecars = sa.Table(
    "sidecars", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),          # mdoc | de_info
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("dataset_id", sa.String(32), index=True),
    sa.Column("created_at", sa.String(32), nullable=False),
)

#: cryoSPARC .cs particle sets (the index file lives under data_dir/particle_sets/<id>/)
particle_sets = sa.Table(
    "particle_sets", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("folder", sa.Text, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("info", sa.JSON, nullable=False, default=dict),
)

#: tus resumable uploads in progress (or finished: dataset_id set)
tus_uploads = sa.Table(
    "tus_uploads", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("length", sa.BigInteger, nullable=False),
    sa.Column("offset", sa.BigInteger, nullable=False),
    sa.Column("metadata", sa.JSON, nullable=False, default=dict),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("expires_at", sa.String(32), nullable=False, index=True),
    sa.Column("dataset_id", sa.String(32), index=True),  # reserved at creation
    sa.Column("completed_at", sa.String(32)),             # set once every byte is in
)

#: converted downloads kept in the datastore (a cache bounded in bytes, least recently
#: used first out); their bytes count in their dataset's stored_bytes
conversions = sa.Table(
    "conversions", metadata,
    sa.Column("dataset_id", sa.String(32), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("used_at", sa.String(32), nullable=False, index=True),
)

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),         # ingest | convert
    sa.Column("dataset_id", sa.String(32), nullable=False, index=True),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("target", sa.JSON),                             # convert: the Target fields
    sa.Column("done", sa.Integer, nullable=False, default=0),  # frames processed
    sa.Column("total", sa.Integer, nullable=False, default=0),
    sa.Column("error", sa.JSON),                              # {"error": code, "detail": ...}
    sa.Column("result", sa.JSON),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("started_at", sa.String(32)),
    sa.Column("finished_at", sa.String(32)),
)

DATASET_STATES = ("receiving", "queued", "processing", "ready", "rejected", "failed")
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
UNFINISHED_JOB_STATES = ("queued", "running")
SORT_KEYS = ("created_at", "name", "size_bytes")
#: (column, DatasetQuery field of the inclusive lower bound, ... of the upper bound)
RANGE_FILTERS = (("total_dose", "min_dose", "max_dose"),
                 ("pixel_size", "min_pixel_size", "max_pixel_size"),
                 ("exposure_s", "min_exposure", "max_exposure"),
                 ("nz", "min_frames", "max_frames"))
#: A name substring matching at most this many rows is looked up in the trigram index;
#: a commoner one is found faster by walking the sort order and testing each name.
RARE_NAME_ROWS = 2000
#: ... and a page of a common one is looked for first among this many rows in sort order.
NAME_WINDOW = 5000

# SQLite only: a trigram full-text index over names, so a substring that matches few or
# no rows does not scan the whole table (external content; kept in step by triggers).
_SQLITE_NAME_INDEX = [
    "CREATE VIRTUAL TABLE IF NOT EXISTS datasets_name USING fts5(name, tokenize='trigram', "
    "content='datasets', content_rowid='rowid')",
    "CREATE TRIGGER IF NOT EXISTS datasets_name_ai AFTER INSERT ON datasets BEGIN "
    "INSERT INTO datasets_name(rowid, name) VALUES (new.rowid, new.name); END",
    "CREATE TRIGGER IF NOT EXISTS datasets_name_ad AFTER DELETE ON datasets BEGIN "
    "INSERT INTO datasets_name(datasets_name, rowid, name) VALUES ('delete', old.rowid, "
    "old.name); END",
    "CREATE TRIGGER IF NOT EXISTS datasets_name_au AFTER UPDATE OF name ON datasets BEGIN "
    "INSERT INTO datasets_name(datasets_name, rowid, name) VALUES ('delete', old.rowid, "
    "old.name); INSERT INTO datasets_name(rowid, name) VALUES (new.rowid, new.name); END",
]
SUMMARY_COLUMNS = [c for c in datasets.c if c.name not in ("info", "path", "frame_stats")]
#: columns a detail read needs (the per-frame statistics have their own endpoint)
DETAIL_COLUMNS = [c for c in datasets.c if c.name != "frame_stats"]


def now() -> str:
    """Current UTC time as fixed-width ISO 8601 text, so text order is time order."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class CursorError(ValueError):
    """A pagination cursor that this catalog did not issue (or for another sort)."""


@dataclass(frozen=True)
class DatasetQuery:
    status: str | None = None
    mode: int | None = None
    sha256: str | None = None
    voltage_kv: float | None = None
    min_dose: float | None = None
    max_dose: float | None = None
    camera: str | None = None
    min_pixel_size: float | None = None   # Å
    max_pixel_size: float | None = None
    min_exposure: float | None = None     # s
    max_exposure: float | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    source: str | None = None
    name: str | None = None            # substring, case-insensitive
    created_after: str | None = None   # ISO text, exclusive
    created_before: str | None = None  # ISO text, exclusive
    sort: str = "created_at"
    descending: bool = True
    limit: int = 50
    cursor: str | None = None


def _encode_cursor(sort: str, value: Any, row_id: str) -> str:
    raw = json.dumps([sort, value, row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str, sort: str) -> tuple[Any, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        cursor_sort, value, row_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise CursorError(f"cursor {cursor!r} is not one this service issued") from exc
    if cursor_sort != sort or not isinstance(row_id, str):
        raise CursorError(f"cursor was issued for sort={cursor_sort!r}, not sort={sort!r}")
    return value, row_id


class Catalog:
    """Datasets and jobs. Thread-safe: every call takes its own connection from the
    engine's pool, so routes (thread pool) and workers can call it concurrently."""

    def __init__(self, url: str):
        self.url = url
        is_sqlite = url.startswith("sqlite")
        self.engine: Engine = sa.create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30} if is_sqlite else {})
        if is_sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        self.name_index = is_sqlite and _trigram_available(self.engine)
        if self.name_index:
            with self.engine.begin() as conn:
                existed = conn.exec_driver_sql(
                    "SELECT 1 FROM sqlite_master WHERE name = 'datasets_name'").first()
                for statement in _SQLITE_NAME_INDEX:
                    conn.exec_driver_sql(statement)
                if not existed:  # a catalog from before the index: fill it once
                    conn.exec_driver_sql("INSERT INTO datasets_name(datasets_name) "
                                         "VALUES ('rebuild')")

    def close(self) -> None:
        self.engine.dispose()

    def _insert(self, table: sa.Table, row: dict[str, Any]) -> dict[str, Any] | None:
        with self.engine.begin() as conn:
            conn.execute(table.insert().values(**row))
        return self._by_id(table, row["id"])

    def _delete(self, table: sa.Table, row_id: str) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(table.delete().where(table.c.id == row_id)).rowcount > 0

    def _by_id(self, table: sa.Table, row_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(table).where(table.c.id == row_id)).first()
        return dict(row._mapping) if row else None

    def ping(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(1)).scalar() == 1

    # -- datasets ---------------------------------------------------------------------

    def add_dataset(self, **row: Any) -> dict[str, Any] | None:
        stamp = now()
        return self._insert(datasets, {"created_at": stamp, "updated_at": stamp, "info": {},
                                       **row})

    def update_dataset(self, dataset_id: str, **fields: Any) -> bool:
        fields["updated_at"] = now()
        with self.engine.begin() as conn:
            result = conn.execute(datasets.update().where(datasets.c.id == dataset_id)
                                  .values(**fields))
        return result.rowcount > 0

    def get_dataset(self, dataset_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(*DETAIL_COLUMNS)
                               .where(datasets.c.id == dataset_id)).first()
        return dict(row._mapping) if row else None

    def frame_stats(self, dataset_id: str) -> tuple[bool, Any]:
        """(whether the dataset exists, its per-frame statistics or None)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(datasets.c.frame_stats)
                               .where(datasets.c.id == dataset_id)).first()
        return (row is not None, row[0] if row is not None else None)

    def find_by_sha256(self, sha256: str, statuses: Iterable[str],
                       exclude_id: str | None = None) -> dict[str, Any] | None:
        query = (sa.select(*DETAIL_COLUMNS).where(datasets.c.sha256 == sha256,
                                                  datasets.c.status.in_(list(statuses)))
                 .order_by(datasets.c.created_at).limit(1))
        if exclude_id is not None:
            query = query.where(datasets.c.id != exclude_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return dict(row._mapping) if row else None

    def find_registration(self, path: str, statuses: Iterable[str]) -> list[dict[str, Any]]:
        query = (sa.select(datasets).where(datasets.c.source == "registration",
                                           datasets.c.path == path,
                                           datasets.c.status.in_(list(statuses)))
                 .order_by(datasets.c.created_at))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def delete_dataset(self, dataset_id: str) -> bool:
        with self.engine.begin() as conn:
            conn.execute(jobs.delete().where(jobs.c.dataset_id == dataset_id))
            conn.execute(sidecars.delete().where(sidecars.c.dataset_id == dataset_id))
            conn.execute(conversions.delete().where(conversions.c.dataset_id == dataset_id))
            result = conn.execute(datasets.delete().where(datasets.c.id == dataset_id))
        return result.rowcount > 0

    def list_datasets(self, q: DatasetQuery) -> tuple[list[dict[str, Any]], str | None]:
        """One page of dataset summaries, and the cursor of the next page (None at the
        end). Keyset pagination on (sort key, id): stable while rows are added."""
        if q.sort not in SORT_KEYS:
            raise CursorError(f"sort must be one of {SORT_KEYS}, got {q.sort!r}")
        key, tie = datasets.c[q.sort], datasets.c.id
        query = sa.select(*SUMMARY_COLUMNS)
        for column, value in (("status", q.status), ("mode", q.mode), ("source", q.source),
                              ("sha256", q.sha256), ("voltage_kv", q.voltage_kv),
                              ("camera", q.camera)):
            if value is not None:
                query = query.where(datasets.c[column] == value)
        for column, low, high in RANGE_FILTERS:
            if getattr(q, low) is not None:
                query = query.where(datasets.c[column] >= getattr(q, low))
            if getattr(q, high) is not None:
                query = query.where(datasets.c[column] <= getattr(q, high))
        if q.created_after:
            query = query.where(datasets.c.created_at > q.created_after)
        if q.created_before:
            query = query.where(datasets.c.created_at < q.created_before)
        if q.cursor:
            value, row_id = _decode_cursor(q.cursor, q.sort)
            if q.descending:
                query = query.where(sa.or_(key < value, sa.and_(key == value, tie < row_id)))
            else:
                query = query.where(sa.or_(key > value, sa.and_(key == value, tie > row_id)))
        order = (key.desc(), tie.desc()) if q.descending else (key.asc(), tie.asc())
        rows = None
        if q.name:
            rows = self._common_name_page(query.order_by(*order), q)
            if rows is None:
                query = query.where(self._name_condition(q.name))
        if rows is None:
            with self.engine.connect() as conn:
                rows = [dict(r._mapping) for r in
                        conn.execute(query.order_by(*order).limit(q.limit + 1))]
        if len(rows) <= q.limit:
            return rows, None
        rows = rows[:q.limit]
        return rows, _encode_cursor(q.sort, rows[-1][q.sort], rows[-1]["id"])

    def _common_name_page(self, ordered: sa.Select, q: DatasetQuery) -> list[dict] | None:
        """A full page for a common name substring, found among the next NAME_WINDOW rows
        in sort order; None when that window holds too few matches (a rarer substring,
        which the trigram index serves instead)."""
        window = ordered.limit(NAME_WINDOW).subquery()
        inner_key, inner_tie = window.c[q.sort], window.c.id
        order = (inner_key.desc(), inner_tie.desc()) if q.descending else \
            (inner_key.asc(), inner_tie.asc())
        page = (sa.select(window).where(window.c.name.ilike(_like_pattern(q.name), escape="\\"))
                .order_by(*order).limit(q.limit + 1))
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(page)]
        return rows if len(rows) > q.limit else None

    def _name_condition(self, text: str) -> sa.ColumnElement[bool]:
        like = datasets.c.name.ilike(_like_pattern(text), escape="\\")
        if not self.name_index or len(text) < 3:  # trigrams need three characters
            return like
        # Without ESCAPE (which the trigram index cannot serve) '%' and '_' in the text act
        # as wildcards here: a superset, which the exact LIKE above then narrows.
        with self.engine.connect() as conn:
            rowids = conn.exec_driver_sql(
                "SELECT rowid FROM datasets_name WHERE name LIKE ? LIMIT ?",
                (f"%{text}%", RARE_NAME_ROWS + 1)).scalars().all()
        if len(rowids) > RARE_NAME_ROWS:
            return like
        return sa.and_(sa.literal_column("datasets.rowid").in_(rowids), like)

    def count_datasets_by_status(self) -> dict[str, int]:
        query = sa.select(datasets.c.status, sa.func.count()).group_by(datasets.c.status)
        with self.engine.connect() as conn:
            counts = dict(conn.execute(query).all())
        return {state: counts.get(state, 0) for state in DATASET_STATES}

    # -- sidecars ---------------------------------------------------------------------

    def add_sidecar(self, **row: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(sidecars.insert().values(created_at=now(), **row))

    def sidecars_of(self, dataset_id: str) -> list[dict[str, Any]]:
        query = (sa.select(sidecars).where(sidecars.c.dataset_id == dataset_id)
                 .order_by(sidecars.c.created_at))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def pending_sidecars(self) -> list[dict[str, Any]]:
        query = sa.select(sidecars).where(sidecars.c.dataset_id.is_(None))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query.order_by(sidecars.c.created_at))]

    def attach_sidecar(self, sidecar_id: str, dataset_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sidecars.update().where(sidecars.c.id == sidecar_id)
                         .values(dataset_id=dataset_id))

    def datasets_named_like(self, prefix: str) -> list[dict[str, Any]]:
        """Live datasets whose name starts with ``prefix`` (sidecar matching)."""
        query = (sa.select(datasets).where(datasets.c.name.like(f"{_escape_like(prefix)}%",
                                                                escape="\\"),
                                           datasets.c.status.in_(("receiving", "queued",
                                                                  "processing", "ready")))
                 .order_by(datasets.c.created_at.desc()))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    # -- tus uploads ------------------------------------------------------------------

    def add_tus_upload(self, **row: Any) -> dict[str, Any] | None:
        return self._insert(tus_uploads, {"created_at": now(), **row})

    def get_tus_upload(self, upload_id: str) -> dict[str, Any] | None:
        return self._by_id(tus_uploads, upload_id)

    def update_tus_upload(self, upload_id: str, **fields: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(tus_uploads.update().where(tus_uploads.c.id == upload_id)
                         .values(**fields))

    def delete_tus_upload(self, upload_id: str) -> None:
        self._delete(tus_uploads, upload_id)

    def tus_upload_of(self, dataset_id: str) -> dict[str, Any] | None:
        query = sa.select(tus_uploads).where(tus_uploads.c.dataset_id == dataset_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return dict(row._mapping) if row else None

    def expired_tus_uploads(self, moment: str) -> list[dict[str, Any]]:
        query = sa.select(tus_uploads).where(tus_uploads.c.expires_at < moment,
                                             tus_uploads.c.completed_at.is_(None))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    # -- particle sets ----------------------------------------------------------------

    def add_particle_set(self, **row: Any) -> dict[str, Any] | None:
        return self._insert(particle_sets, {"created_at": now(), **row})

    def get_particle_set(self, set_id: str) -> dict[str, Any] | None:
        return self._by_id(particle_sets, set_id)

    def delete_particle_set(self, set_id: str) -> bool:
        return self._delete(particle_sets, set_id)

    # -- jobs -------------------------------------------------------------------------

    def add_job(self, **row: Any) -> dict[str, Any] | None:
        return self._insert(jobs, {"state": "queued", "done": 0, "total": 0,
                                   "created_at": now(), **row})

    def update_job(self, job_id: str, **fields: Any) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(jobs.update().where(jobs.c.id == job_id).values(**fields))
        return result.rowcount > 0

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        return self._by_id(jobs, job_id)

    def finish_job(self, job_id: str, *, state: str, result: Any = None,
                   error: Any = None) -> dict[str, Any] | None:
        self.update_job(job_id, state=state, result=result, error=error, finished_at=now())
        return self.get_job(job_id)

    # -- converted downloads ----------------------------------------------------------

    def record_conversion(self, dataset_id: str, key: str, size: int) -> None:
        """A conversion is stored (or was just served): count its bytes once, mark it
        used now."""
        stamp = now()
        with self.engine.begin() as conn:
            touched = conn.execute(conversions.update().where(
                conversions.c.dataset_id == dataset_id, conversions.c.key == key)
                .values(used_at=stamp)).rowcount
            if touched:
                return
            conn.execute(conversions.insert().values(dataset_id=dataset_id, key=key,
                                                     bytes=size, created_at=stamp,
                                                     used_at=stamp))
            conn.execute(datasets.update().where(datasets.c.id == dataset_id).values(
                stored_bytes=sa.func.coalesce(datasets.c.stored_bytes, 0) + size))

    def forget_conversion(self, dataset_id: str, key: str) -> None:
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(conversions.c.bytes).where(
                conversions.c.dataset_id == dataset_id, conversions.c.key == key)).first()
            if row is None:
                return
            conn.execute(conversions.delete().where(conversions.c.dataset_id == dataset_id,
                                                    conversions.c.key == key))
            conn.execute(datasets.update().where(datasets.c.id == dataset_id).values(
                stored_bytes=datasets.c.stored_bytes - row[0]))

    def conversion_exists(self, dataset_id: str, key: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(conversions.c.key).where(
                conversions.c.dataset_id == dataset_id, conversions.c.key == key)).first() \
                is not None

    def conversions_to_evict(self, limit_bytes: int,
                             keep: str | None = None) -> list[dict[str, Any]]:
        """The least recently used conversions to drop so that the rest fit
        ``limit_bytes`` (never ``keep``)."""
        with self.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(conversions.c.bytes),
                                                            0))).scalar()
            if total <= limit_bytes:
                return []
            rows = conn.execute(sa.select(conversions).order_by(conversions.c.used_at))
            out = []
            for row in rows:
                if total <= limit_bytes:
                    break
                if row.key == keep:
                    continue
                out.append(dict(row._mapping))
                total -= row.bytes
        return out

    def storage_totals(self) -> dict[str, int]:
        """Bytes received and bytes stored over all datasets."""
        query = sa.select(sa.func.coalesce(sa.func.sum(datasets.c.size_bytes), 0),
                          sa.func.coalesce(sa.func.sum(datasets.c.stored_bytes), 0))
        with self.engine.connect() as conn:
            received, stored = conn.execute(query).one()
        return {"received": int(received), "stored": int(stored)}

    def jobs_in_states(self, states: Iterable[str],
                       dataset_id: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(jobs).where(jobs.c.state.in_(list(states)))
        if dataset_id is not None:
            query = query.where(jobs.c.dataset_id == dataset_id)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query.order_by(jobs.c.created_at))]

    def list_jobs(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        query = sa.select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        if state is not None:
            query = query.where(jobs.c.state == state)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def count_jobs_by_state(self) -> dict[str, int]:
        query = sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)
        with self.engine.connect() as conn:
            counts = dict(conn.execute(query).all())
        return {state: counts.get(state, 0) for state in JOB_STATES}


def _add_missing_columns(engine: Engine) -> None:
    """Catalogs made by an older version lack newer (nullable) columns: add them."""
    inspector = sa.inspect(engine)
    for table in (datasets, jobs, sidecars, particle_sets, tus_uploads, conversions):
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present and column.nullable:
                with engine.begin() as conn:
                    conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column.name} "
                                         f"{column.type.compile(engine.dialect)}")
        for index in table.indexes:
            index.create(engine, checkfirst=True)


def _escape_like(text: str) -> str:
    """``text`` with LIKE's own wildcards escaped (escape character ``\\``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _like_pattern(text: str) -> str:
    """``%text%``: a substring match of ``text`` taken literally."""
    return f"%{_escape_like(text)}%"


def _trigram_available(engine: Engine) -> bool:
    """FTS5 with the trigram tokenizer needs SQLite >= 3.34 built with FTS5."""
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE VIRTUAL TABLE temp.trigram_probe USING "
                                 "fts5(x, tokenize='trigram')")
            conn.exec_driver_sql("DROP TABLE temp.trigram_probe")
        return True
    except sa.exc.OperationalError:
        return False


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
