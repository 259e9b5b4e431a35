"""Datasets and what hangs off them: sidecars, cached conversions, particle sets; the
paged, filtered listing and the name search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import sqlalchemy as sa

from .base import CatalogBase
from .paging import CursorError, after_cursor, page_of
from .sessions import standout_frames
from .schema import (DATASET_STATES, DETAIL_COLUMNS, LIVE_STATUSES, SESSION_FIGURE_COLUMNS,
                     SORT_KEYS, SUMMARY_COLUMNS, TOMBSTONE, Fence, conversions, datasets, jobs,
                     lease_held, particle_sets, sessions, sidecars, tus_uploads)

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
    session_id: str | None = None
    projects: frozenset[str] | None = None  # None: every project (the caller's scope)
    sort: str = "created_at"
    descending: bool = True
    limit: int = 50
    cursor: str | None = None


def escape_like(text: str) -> str:
    """``text`` with LIKE's own wildcards escaped (escape character ``\\``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def like_pattern(text: str) -> str:
    """``%text%``: a substring match of ``text`` taken literally."""
    return f"%{escape_like(text)}%"


class DatasetRows(CatalogBase):
    #: SQLite with FTS5 trigram support: the datasets_name index exists (migrations)
    name_index = False

    # -- datasets ---------------------------------------------------------------------

    def add_dataset(self, **row: Any) -> dict[str, Any] | None:
        """A new dataset row. In a session (``session_id``), its project is the session's
        as it is at this instant, read in the same statement with the session row
        share-locked: a session moved or deleted meanwhile either waits for this row
        (and takes it along) or is seen as it is after; a session already deleted makes
        no row (None)."""
        stamp = self.now()
        values = {"created_at": stamp, "updated_at": stamp, "info": {}, **row}
        session_id = values.get("session_id")
        if session_id is None:
            return self._insert(datasets, values)
        values.pop("project", None)
        names = list(values)
        source = sa.select(*(sa.literal(values[n], type_=datasets.c[n].type)
                             if not isinstance(values[n], sa.ColumnElement) else values[n]
                             for n in names), sessions.c.project).where(
            sessions.c.id == session_id).with_for_update(read=True)
        with self.engine.begin() as conn:
            made = conn.execute(datasets.insert().from_select(
                [*names, "project"], source)).rowcount
        if not made:
            return None
        self._session_changed(session_id)
        return self.get_dataset(values["id"])

    def _session_changed(self, session_id: str | None) -> None:
        """A dataset of ``session_id`` changed what its session's figures are made of
        (the change is committed): recompute them, at once or coalesced with the next
        changes within ``session_refresh_seconds`` (:mod:`.refresher`). A failure
        loses no data: the session's next change recomputes them whole."""
        if session_id is not None:
            self.session_figures.changed(session_id)

    def update_dataset(self, dataset_id: str, *, fence: Fence | None = None,
                       **fields: Any) -> bool:
        """Update a dataset (not one being deleted); with ``fence`` the write happens
        only while that claim still holds its job's lease (a worker that lost it writes
        nothing). False when no row was written."""
        fields["updated_at"] = self.now()
        guard = [datasets.c.id == dataset_id, datasets.c.status != TOMBSTONE]
        with self.engine.begin() as conn:
            if fence is not None:
                if not self._fence_holds(conn, fence):
                    return False
                guard.append(_held(fence))
            written = conn.execute(datasets.update().where(*guard).values(**fields)
                                   .returning(datasets.c.session_id)).all()
        if written and SESSION_FIGURE_COLUMNS.intersection(fields):
            self._session_changed(written[0][0])
        return bool(written)

    def _fence_holds(self, conn: sa.Connection, fence: Fence) -> bool:
        """PostgreSQL: the job row stays share-locked until the caller's transaction
        commits, so a worker claiming the lapsed lease meanwhile (FOR UPDATE SKIP LOCKED)
        waits for the next poll instead of running beside a write that is landing. Every
        fenced write also carries the check in its own WHERE (:func:`_held`): on SQLite,
        whose transactions take the write lock only at their first write, that is what
        makes the check and the write one step."""
        if not self.is_postgres:
            return True
        return conn.execute(sa.select(jobs.c.id).where(lease_held(fence))
                            .with_for_update(read=True)).first() is not None

    def commit_ingest(self, dataset_id: str, fields: dict[str, Any], *,
                      fence: Fence | None, job_result: dict[str, Any] | None,
                      tus_upload_id: str | None) -> str:
        """The commit step of the protocol (ARCHITECTURE.md), in one transaction: the
        dataset becomes ``ready``/``rejected`` with the keys of its stored objects, the
        job of ``fence`` is finished with ``job_result``, a resumable upload is marked
        completed. Nothing is written unless all of it is. Returns "committed", or why
        not: "lease_lost" (the fence no longer holds), "gone" (deleted, or being
        deleted), "already" (committed before: a dataset is committed once)."""
        fields = {**fields, "updated_at": self.now()}
        if fields.get("frame_stats"):
            fields["standout_frames"] = len(standout_frames(fields["frame_stats"].get("mean")))
        # Each write carries its own guard, so a check and its write are one statement
        # (a DELETE's tombstone, a new claim or another commit landing in between makes
        # it write nothing, and the transaction is rolled back whole).
        guard = [datasets.c.id == dataset_id,
                 datasets.c.status.notin_((TOMBSTONE, "ready", "rejected"))]
        if fence is not None:
            guard.append(_held(fence))
        try:
            with self.durable_commit() as conn:
                if fence is not None and not self._fence_holds(conn, fence):
                    return "lease_lost"
                if not conn.execute(datasets.update().where(*guard).values(**fields)).rowcount:
                    return self._why_not_committed(conn, dataset_id, fence)
                if fence is not None and not conn.execute(
                        jobs.update().where(lease_held(fence)).values(
                            state="done", result=job_result, error=None,
                            finished_at=self.now(), lease_owner=None,
                            lease_expires_at=None)).rowcount:
                    raise _NotCommitted("lease_lost")  # claimed again since: roll back
                if tus_upload_id is not None:
                    conn.execute(tus_uploads.update()
                                 .where(tus_uploads.c.id == tus_upload_id)
                                 .values(completed_at=self.now(), dataset_id=dataset_id))
        except _NotCommitted as refused:
            return refused.verdict
        return "committed"  # the caller refreshes the session, outside its locks

    def dataset_changed(self, dataset_id: str) -> None:
        """A change to the dataset was committed by the caller: its session's figures."""
        self._session_changed(self._session_of(dataset_id))

    def _session_of(self, dataset_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(datasets.c.session_id)
                                .where(datasets.c.id == dataset_id)).scalar()

    def _why_not_committed(self, conn: sa.Connection, dataset_id: str,
                           fence: Fence | None) -> str:
        if fence is not None and conn.execute(sa.select(jobs.c.id)
                                              .where(lease_held(fence))).first() is None:
            return "lease_lost"
        status = conn.execute(sa.select(datasets.c.status)
                              .where(datasets.c.id == dataset_id)).scalar()
        return "gone" if status is None or status == TOMBSTONE else "already"

    def delete_receiving(self, dataset_id: str) -> bool:
        """Delete a dataset (and its jobs, sidecars, cached conversions) only while it is
        still ``receiving``, in one step: a pass committing at the same moment wins, or
        this does, never both."""
        with self.engine.begin() as conn:
            gone = conn.execute(datasets.delete().where(
                datasets.c.id == dataset_id, datasets.c.status == "receiving")
                .returning(datasets.c.session_id)).all()
            if gone:
                conn.execute(jobs.delete().where(jobs.c.dataset_id == dataset_id))
                conn.execute(sidecars.delete().where(sidecars.c.dataset_id == dataset_id))
                conn.execute(conversions.delete().where(
                    conversions.c.dataset_id == dataset_id))
        if gone:
            self._session_changed(gone[0][0])
        return bool(gone)

    def mark_deleting(self, dataset_id: str) -> bool:
        """Make the dataset a tombstone (hidden; its objects are removed next, then its
        row); False when there is no such dataset."""
        with self.engine.begin() as conn:
            marked = conn.execute(datasets.update().where(datasets.c.id == dataset_id)
                                  .values(status=TOMBSTONE, progress=None,
                                          updated_at=self.now())
                                  .returning(datasets.c.session_id)).all()
        if marked:
            self._session_changed(marked[0][0])
        return bool(marked)

    def tombstones(self) -> list[str]:
        """Datasets whose deletion was cut off (the sweep finishes them)."""
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(datasets.c.id)
                                     .where(datasets.c.status == TOMBSTONE)).scalars())

    def get_dataset(self, dataset_id: str) -> dict[str, Any] | None:
        return self._by_id(datasets, dataset_id, DETAIL_COLUMNS)

    def frame_stats(self, dataset_id: str,
                    projects: frozenset[str] | None = None) -> tuple[bool, Any]:
        """(whether the dataset exists (in ``projects``, when given), its per-frame
        statistics or None)."""
        query = sa.select(datasets.c.frame_stats).where(datasets.c.id == dataset_id,
                                                        datasets.c.status != TOMBSTONE)
        if projects is not None:
            query = query.where(datasets.c.project.in_(sorted(projects)))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return (row is not None, row[0] if row is not None else None)

    def project_of(self, dataset_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(datasets.c.project)
                                .where(datasets.c.id == dataset_id)).scalar()

    def find_by_sha256(self, sha256: str, statuses: Iterable[str] = LIVE_STATUSES,
                       exclude_id: str | None = None,
                       project: str | None = None) -> dict[str, Any] | None:
        """The oldest dataset of these bytes in ``statuses`` (of ``project``, when
        given: uploads are deduplicated within a project)."""
        query = (sa.select(*DETAIL_COLUMNS).where(datasets.c.sha256 == sha256,
                                                  datasets.c.status.in_(list(statuses)))
                 .order_by(datasets.c.created_at).limit(1))
        if exclude_id is not None:
            query = query.where(datasets.c.id != exclude_id)
        if project is not None:
            query = query.where(datasets.c.project == project)
        rows = self._rows(query)
        return rows[0] if rows else None

    def find_registration(self, path: str, statuses: Iterable[str]) -> list[dict[str, Any]]:
        return self._rows(sa.select(*DETAIL_COLUMNS).where(
            datasets.c.source == "registration", datasets.c.path == path,
            datasets.c.status.in_(list(statuses))).order_by(datasets.c.created_at))

    def delete_dataset(self, dataset_id: str) -> bool:
        with self.engine.begin() as conn:
            conn.execute(jobs.delete().where(jobs.c.dataset_id == dataset_id))
            conn.execute(sidecars.delete().where(sidecars.c.dataset_id == dataset_id))
            conn.execute(conversions.delete().where(conversions.c.dataset_id == dataset_id))
            gone = conn.execute(datasets.delete().where(datasets.c.id == dataset_id)
                                .returning(datasets.c.session_id, datasets.c.status)).all()
        if gone and gone[0][1] != TOMBSTONE:  # a tombstone counts in no figure already
            self._session_changed(gone[0][0])
        return bool(gone)

    def list_datasets(self, q: DatasetQuery) -> tuple[list[dict[str, Any]], str | None]:
        """One page of dataset summaries, and the cursor of the next page (None at the
        end). Keyset pagination on (sort key, id): stable while rows are added."""
        if q.sort not in SORT_KEYS:
            raise CursorError(f"sort must be one of {SORT_KEYS}, got {q.sort!r}")
        key, tie = datasets.c[q.sort], datasets.c.id
        query = sa.select(*SUMMARY_COLUMNS).where(datasets.c.status != TOMBSTONE)
        for column, value in (("status", q.status), ("mode", q.mode), ("source", q.source),
                              ("sha256", q.sha256), ("voltage_kv", q.voltage_kv),
                              ("camera", q.camera), ("session_id", q.session_id)):
            if value is not None:
                query = query.where(datasets.c[column] == value)
        if q.projects is not None:
            query = query.where(datasets.c.project.in_(sorted(q.projects)))
        for column, low, high in RANGE_FILTERS:
            if getattr(q, low) is not None:
                query = query.where(datasets.c[column] >= getattr(q, low))
            if getattr(q, high) is not None:
                query = query.where(datasets.c[column] <= getattr(q, high))
        if q.created_after:
            query = query.where(datasets.c.created_at > q.created_after)
        if q.created_before:
            query = query.where(datasets.c.created_at < q.created_before)
        query = after_cursor(query, key, tie, q.cursor, q.sort, q.descending)
        order = (key.desc(), tie.desc()) if q.descending else (key.asc(), tie.asc())
        rows = None
        if q.name:
            rows = self._common_name_page(query.order_by(*order), q)
            if rows is None:
                query = query.where(self._name_condition(q.name))
        if rows is None:
            rows = self._rows(query.order_by(*order).limit(q.limit + 1))
        return page_of(rows, q.limit, q.sort)

    def _common_name_page(self, ordered: sa.Select, q: DatasetQuery) -> list[dict] | None:
        """A full page for a common name substring, found among the next NAME_WINDOW rows
        in sort order; None when that window holds too few matches (a rarer substring,
        which the trigram index serves instead)."""
        window = ordered.limit(NAME_WINDOW).subquery()
        inner_key, inner_tie = window.c[q.sort], window.c.id
        order = (inner_key.desc(), inner_tie.desc()) if q.descending else \
            (inner_key.asc(), inner_tie.asc())
        rows = self._rows(sa.select(window).where(
            window.c.name.ilike(like_pattern(q.name), escape="\\")).order_by(*order)
            .limit(q.limit + 1))
        return rows if len(rows) > q.limit else None

    def _name_condition(self, text: str) -> sa.ColumnElement[bool]:
        """The exact, case-insensitive substring test. On PostgreSQL a pg_trgm GIN index
        serves it directly; on SQLite an FTS5 trigram table narrows the rows first."""
        like = datasets.c.name.ilike(like_pattern(text), escape="\\")
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

    def storage_totals(self) -> dict[str, int]:
        """Bytes received and bytes stored over all datasets."""
        query = sa.select(sa.func.coalesce(sa.func.sum(datasets.c.size_bytes), 0),
                          sa.func.coalesce(sa.func.sum(datasets.c.stored_bytes), 0))
        with self.engine.connect() as conn:
            received, stored = conn.execute(query).one()
        return {"received": int(received), "stored": int(stored)}

    # -- sidecars ---------------------------------------------------------------------

    def add_sidecar(self, **row: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(sidecars.insert().values(created_at=self.now(), **row))

    def sidecars_of(self, dataset_id: str) -> list[dict[str, Any]]:
        return self._rows(sa.select(sidecars).where(sidecars.c.dataset_id == dataset_id)
                          .order_by(sidecars.c.created_at, sidecars.c.id))

    def pending_sidecars(self, project: str | None = None) -> list[dict[str, Any]]:
        """Sidecars waiting for their movie (of ``project``: a sidecar sent for one
        project never joins another's movie)."""
        query = sa.select(sidecars).where(sidecars.c.dataset_id.is_(None))
        if project is not None:
            query = query.where(sidecars.c.project == project)
        return self._rows(query.order_by(sidecars.c.created_at, sidecars.c.id))

    def attach_sidecar(self, sidecar_id: str, dataset_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sidecars.update().where(sidecars.c.id == sidecar_id)
                         .values(dataset_id=dataset_id))

    def datasets_named_like(self, prefix: str,
                            project: str | None = None) -> list[dict[str, Any]]:
        """Live datasets whose name starts with ``prefix`` (sidecar matching), of
        ``project`` when given."""
        query = sa.select(*DETAIL_COLUMNS).where(
            datasets.c.name.like(f"{escape_like(prefix)}%", escape="\\"),
            datasets.c.status.in_(LIVE_STATUSES))
        if project is not None:
            query = query.where(datasets.c.project == project)
        return self._rows(query.order_by(datasets.c.created_at.desc()))

    # -- converted downloads ----------------------------------------------------------

    def record_conversion(self, dataset_id: str, key: str, size: int) -> None:
        """A conversion is stored (or was just served): count its bytes once, mark it
        used now."""
        stamp = self.now()
        with self.engine.begin() as conn:
            touched = conn.execute(conversions.update().where(
                conversions.c.dataset_id == dataset_id, conversions.c.key == key)
                .values(used_at=stamp)).rowcount
            if touched:
                return
            try:
                with conn.begin_nested():  # another replica may record it at the same time
                    conn.execute(conversions.insert().values(
                        dataset_id=dataset_id, key=key, bytes=size, created_at=stamp,
                        used_at=stamp))
            except sa.exc.IntegrityError:
                return
            conn.execute(datasets.update().where(datasets.c.id == dataset_id).values(
                stored_bytes=sa.func.coalesce(datasets.c.stored_bytes, 0) + size))
        self._session_changed(self._session_of(dataset_id))

    def forget_conversion(self, dataset_id: str, key: str) -> None:
        with self.engine.begin() as conn:
            gone = conn.execute(conversions.delete().where(
                conversions.c.dataset_id == dataset_id, conversions.c.key == key)
                .returning(conversions.c.bytes)).first()
            if gone is not None:
                conn.execute(datasets.update().where(datasets.c.id == dataset_id).values(
                    stored_bytes=datasets.c.stored_bytes - gone[0]))
        if gone is not None:
            self._session_changed(self._session_of(dataset_id))

    def conversion_exists(self, dataset_id: str, key: str) -> bool:
        return bool(self._count(conversions, conversions.c.dataset_id == dataset_id,
                                conversions.c.key == key))

    def conversions_to_evict(self, limit_bytes: int,
                             keep: str | None = None) -> list[dict[str, Any]]:
        """The least recently used conversions to drop so that the rest fit
        ``limit_bytes`` (never ``keep``)."""
        with self.engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(conversions.c.bytes),
                                                            0))).scalar()
            if total <= limit_bytes:
                return []
            out = []
            for row in conn.execute(sa.select(conversions).order_by(conversions.c.used_at)):
                if total <= limit_bytes:
                    break
                if row.key == keep:
                    continue
                out.append(dict(row._mapping))
                total -= row.bytes
        return out

    # -- particle sets ----------------------------------------------------------------

    def add_particle_set(self, **row: Any) -> dict[str, Any] | None:
        return self._insert(particle_sets, {"created_at": self.now(), **row})

    def get_particle_set(self, set_id: str) -> dict[str, Any] | None:
        return self._by_id(particle_sets, set_id)

    def delete_particle_set(self, set_id: str) -> bool:
        return self._delete(particle_sets, set_id)


class _NotCommitted(Exception):
    """Rolls a commit transaction back; carries the verdict."""

    def __init__(self, verdict: str):
        super().__init__(verdict)
        self.verdict = verdict


def _held(fence: Fence) -> sa.ColumnElement[bool]:
    """The claim ``fence`` holds its lease, as a condition another table's write can
    carry."""
    return sa.exists(sa.select(jobs.c.id).where(lease_held(fence)))
