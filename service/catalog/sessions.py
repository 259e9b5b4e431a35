"""Sessions: a microscope day's movies, grouped under a project, and the figures a
dashboard shows for each (counts, bytes, acquisition ranges, rate, problems).

The figures live in the session's row and are recomputed from its datasets whenever one
of them changes (:meth:`SessionRows.refresh_session`, called by every catalog write that
touches a figure column), so listing sessions reads rows and never aggregates datasets.
A recompute is one indexed pass over one session's datasets, taken under the session
row's write lock: two replicas landing movies in one session at once each recompute
after their own commit, and the later recompute sees both.
"""

from __future__ import annotations

import json
import math
import statistics
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterator

import sqlalchemy as sa

from .base import CatalogBase
from .paging import CursorError, after_cursor, page_of
from .schema import (SESSION_LIST_COLUMNS, SESSION_SORT_KEYS, SUMMARY_COLUMNS, TOMBSTONE,
                     datasets, sessions, sidecars, tus_uploads)

#: what a session lists of its problems, each kind (the counts cover all of them)
PROBLEMS_LISTED = 20
#: the acquisition rate's bucket: movies per this many minutes
RATE_MINUTES = 10
#: ISO text up to the tens of minutes ("2026-12-06T02:4") names a 10-minute bucket
_RATE_PREFIX = 15
IN_FLIGHT = ("receiving", "queued", "processing")
#: summary name -> the dataset expression whose range it is
RANGES = {
    "voltage_kv": datasets.c.voltage_kv,
    "pixel_size_angstrom": datasets.c.pixel_size,
    "dose_per_frame": sa.case((datasets.c.nz > 0, datasets.c.total_dose / datasets.c.nz)),
    "total_dose": datasets.c.total_dose,
    "exposure_s": datasets.c.exposure_s,
    "frames": datasets.c.nz,
}


def standout_frames(means: list[float] | None) -> list[int]:
    """Frames whose mean stands far from the movie's others (a blanked or dropped frame,
    a flash): more than 6 robust standard deviations (1.4826 x the median absolute
    deviation) and more than 5 % of the median away from the median frame mean. A dose
    fall-off over the movie moves every mean a little and flags none. Frames without a
    mean (not measured: a frame that failed validation, NaN) are not judged."""
    measured = [(k, m) for k, m in enumerate(means or [])
                if isinstance(m, (int, float)) and math.isfinite(m)]
    if len(measured) < 3:
        return []
    middle = statistics.median(m for _, m in measured)
    spread = 1.4826 * statistics.median(abs(m - middle) for _, m in measured)
    floor = 0.05 * abs(middle)
    return [k for k, m in measured
            if abs(m - middle) > max(6 * spread, floor) and abs(m - middle) > 0]


@dataclass(frozen=True)
class SessionQuery:
    projects: frozenset[str] | None = None   # None: every project
    project: str | None = None
    microscope: str | None = None
    source: str | None = None
    started_after: str | None = None         # ISO text, exclusive (first movie)
    started_before: str | None = None
    sort: str = "last_movie_at"
    descending: bool = True
    limit: int = 50
    cursor: str | None = None


class SessionRows(CatalogBase):
    # -- placing datasets ---------------------------------------------------------------

    def session_for(self, project: str, name: str, source: str) -> dict[str, Any]:
        """The session ``name`` of ``project``, made on first use (two replicas making
        it at once: one insert wins, the other reads it)."""
        found = self._session_named(project, name)
        if found is not None:
            return found
        stamp = self.now()
        try:
            with self.engine.begin() as conn:
                conn.execute(sessions.insert().values(
                    id=_new_id(), name=name, project=project, source=source,
                    created_at=stamp, updated_at=stamp, summary={}))
        except sa.exc.IntegrityError:
            pass
        found = self._session_named(project, name)
        assert found is not None
        return found

    def _session_named(self, project: str, name: str) -> dict[str, Any] | None:
        rows = self._rows(sa.select(sessions).where(sessions.c.project == project,
                                                    sessions.c.name == name))
        return rows[0] if rows else None

    def get_session(self, session_id: str) -> dict[str, Any] | None:
        return self._by_id(sessions, session_id)

    # -- the figures --------------------------------------------------------------------

    def refresh_session(self, session_id: str | None) -> bool | None:
        """Recompute one session's figures from its datasets (not its tombstones); False
        when there is no such session."""
        if session_id is None:
            return None
        with self.engine.begin() as conn:
            return write_figures(conn, session_id, self.now())

    def refresh_stale_sessions(self, days: float = 7.0, recent_hours: float = 24.0) -> int:
        """What a coalesced recompute lost with its process (or run while the catalog
        was away) left stale, recomputed now: every session recomputed in the last
        ``recent_hours`` (a change that removed a row, or touched only stored bytes,
        leaves no other trace), and any whose figures predate a change to one of its
        datasets that arrived in the last ``days``. Returns how many."""
        d, s = datasets.c, sessions.c
        stale = sa.select(s.id).where(sa.or_(
            s.updated_at > self.now(-recent_hours * 3600.0),
            sa.exists(sa.select(d.id).where(
                d.session_id == s.id, d.created_at > self.now(-days * 86400.0),
                d.updated_at > s.updated_at))))
        with self.engine.connect() as conn:
            ids = list(conn.execute(stale).scalars())
        for session_id in ids:
            self.refresh_session(session_id)
        return len(ids)

    def refresh_all_sessions(self) -> int:
        with self.engine.connect() as conn:
            ids = list(conn.execute(sa.select(sessions.c.id)).scalars())
        for session_id in ids:
            self.refresh_session(session_id)
        return len(ids)

    # -- listing ------------------------------------------------------------------------

    def list_sessions(self, q: SessionQuery) -> tuple[list[dict[str, Any]], str | None]:
        """One page of sessions (keyset pagination on (sort key, id), as datasets):
        those with at least one movie."""
        if q.sort not in SESSION_SORT_KEYS:
            raise CursorError(f"sort must be one of {SESSION_SORT_KEYS}, got {q.sort!r}")
        key, tie = sessions.c[q.sort], sessions.c.id
        # not the detail's summary (rate timeline, problem lists: kilobytes of JSON per
        # session): the list's figures have columns of their own
        query = sa.select(*SESSION_LIST_COLUMNS)
        if q.projects is not None:
            query = query.where(sessions.c.project.in_(sorted(q.projects)))
        for column, value in (("project", q.project), ("microscope", q.microscope),
                              ("source", q.source)):
            if value is not None:
                query = query.where(sessions.c[column] == value)
        if q.started_after:
            query = query.where(sessions.c.first_movie_at > q.started_after)
        if q.started_before:
            query = query.where(sessions.c.first_movie_at < q.started_before)
        # A session without movies (made by a placement whose movie never landed, or
        # emptied by deletions) is not listed, whatever the sort: GET by id still finds it.
        query = query.where(sessions.c.first_movie_at.isnot(None))
        query = after_cursor(query, key, tie, q.cursor, q.sort, q.descending)
        order = (key.desc(), tie.desc()) if q.descending else (key.asc(), tie.asc())
        return page_of(self._rows(query.order_by(*order).limit(q.limit + 1)), q.limit, q.sort)

    def projects(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(sessions.c.project).distinct()
                                     .order_by(sessions.c.project)).scalars())

    def session_movies(self, session_id: str, columns: list[sa.Column] | None = None,
                       batch: int = 2000) -> Iterator[dict[str, Any]]:
        """The session's datasets (not tombstones), oldest first, read in keyset pages
        of ``batch`` rows: an export of 100,000 movies holds one page at a time."""
        columns = columns or SUMMARY_COLUMNS
        d = datasets.c
        after: tuple[str, str] | None = None
        while True:
            query = sa.select(*columns).where(d.session_id == session_id,
                                              d.status != TOMBSTONE)
            if after is not None:
                query = query.where(sa.or_(d.created_at > after[0], sa.and_(
                    d.created_at == after[0], d.id > after[1])))
            rows = self._rows(query.order_by(d.created_at, d.id).limit(batch))
            yield from rows
            if len(rows) < batch:
                return
            after = (rows[-1]["created_at"], rows[-1]["id"])

    # -- admin --------------------------------------------------------------------------

    def change_session(self, session_id: str, *, name: str | None = None,
                       project: str | None = None) -> str:
        """Rename a session and/or move it (with its datasets, their sidecars and its
        uploads) to another project, in one transaction. Returns "changed", "missing",
        "taken" (the target project has a session of that name already) or "duplicate"
        (the target project holds a live upload of the same bytes as one of this
        session's movies: a project keeps one live upload per content)."""
        values = {k: v for k, v in (("name", name), ("project", project)) if v is not None}
        if not values:
            return "changed" if self.get_session(session_id) else "missing"
        d = datasets.c
        try:
            with self.engine.begin() as conn:
                try:
                    written = conn.execute(sessions.update().where(
                        sessions.c.id == session_id).values(updated_at=self.now(),
                                                            **values)).rowcount
                except sa.exc.IntegrityError:
                    raise _Refused("taken") from None
                if not written:
                    return "missing"
                if project is not None:
                    try:
                        conn.execute(datasets.update().where(d.session_id == session_id)
                                     .values(project=project))
                    except sa.exc.IntegrityError:
                        raise _Refused("duplicate") from None
                    conn.execute(sidecars.update().where(sidecars.c.dataset_id.in_(
                        sa.select(d.id).where(d.session_id == session_id)))
                        .values(project=project))
                    conn.execute(tus_uploads.update().where(
                        tus_uploads.c.session_id == session_id).values(project=project))
        except _Refused as refused:
            return refused.verdict
        return "changed"

    def delete_session(self, session_id: str) -> list[str]:
        """In one transaction: every dataset of the session becomes a tombstone (hidden;
        its objects and row are removed next, as for one deleted alone), its unfinished
        resumable uploads expire (their next PATCH is answered 410 and the expiry sweep
        drops their bytes: a movie whose header had not arrived never lands as a
        dataset of no session) and the session row goes. Returns the datasets' ids."""
        with self.engine.begin() as conn:
            # The session row first (a move takes it first too: no deadlock between
            # them): a dataset being made in the session share-locks it, so that one
            # commits before this goes on and the tombstoning below, a later snapshot,
            # includes it; one made after finds no session and is not made
            # (DatasetRows.add_dataset).
            conn.execute(sessions.delete().where(sessions.c.id == session_id))
            ids = list(conn.execute(datasets.update().where(
                datasets.c.session_id == session_id, datasets.c.status != TOMBSTONE)
                .values(status=TOMBSTONE, progress=None, updated_at=self.now())
                .returning(datasets.c.id)).scalars())
            conn.execute(tus_uploads.update().where(
                tus_uploads.c.session_id == session_id, tus_uploads.c.completed_at.is_(None))
                .values(expires_at=self.now(-1)))
        return ids



def write_figures(conn: sa.Connection, session_id: str,
                  stamp: sa.ColumnElement[str]) -> bool:
    """Recompute one session's figures from its datasets (not its tombstones) and write
    them into its row, in ``conn``'s transaction; False when there is no such session.
    Reads and writes only columns that exist since revision 0004, which calls it for
    the sessions it makes (a migration may run this with a later schema's tables)."""
    d = datasets.c
    live = sa.and_(d.session_id == session_id, d.status != TOMBSTONE)
    # The write first: it takes the row's lock (and on SQLite the database's), so what
    # is read next includes every commit before this recompute began.
    if not conn.execute(sessions.update().where(sessions.c.id == session_id)
                        .values(updated_at=stamp)).rowcount:
        return False
    counts = conn.execute(sa.select(
        sa.func.count(),
        *(sa.func.coalesce(sa.func.sum(sa.case((d.status == s, 1), else_=0)), 0)
          for s in ("ready", "rejected", "failed")),
        sa.func.coalesce(sa.func.sum(sa.case((d.status.in_(IN_FLIGHT), 1), else_=0)), 0),
        sa.func.coalesce(sa.func.sum(d.size_bytes), 0),
        sa.func.coalesce(sa.func.sum(d.stored_bytes), 0),
        sa.func.min(d.created_at), sa.func.max(d.created_at),
        *(f(expr) for expr in RANGES.values() for f in (sa.func.min, sa.func.max)),
    ).where(live)).one()
    (movies, ready, rejected, failed, in_flight, received, stored, first,
     last) = counts[:9]
    bounds = counts[9:]
    ranges = {name: _range(bounds[2 * i], bounds[2 * i + 1])
              for i, name in enumerate(RANGES)}
    cameras = conn.execute(sa.select(d.camera, sa.func.count()).where(
        live, d.camera.isnot(None)).group_by(d.camera)
        .order_by(sa.func.count().desc(), d.camera)).all()
    bucket = sa.func.substr(d.created_at, 1, _RATE_PREFIX)
    timeline = conn.execute(sa.select(bucket, sa.func.count()).where(live)
                            .group_by(bucket).order_by(bucket)).all()
    rate, problems = _rate(timeline, movies, first, last), _problems(conn, live)
    summary = {
        "acquisition": ranges,
        "cameras": [{"camera": c, "movies": n} for c, n in cameras],
        "rate": rate,
        "problems": problems,
    }
    conn.execute(sessions.update().where(sessions.c.id == session_id).values(
        movies=movies, ready=ready, rejected=rejected, failed=failed,
        in_flight=in_flight, bytes_received=received, bytes_stored=stored,
        first_movie_at=first, last_movie_at=last,
        microscope=cameras[0][0] if cameras else None, summary=summary,
        acquisition=ranges, rate_per_10_minutes=rate["per_bucket"],
        standing_out=problems["standing_out_count"]))
    return True


def _problems(conn: sa.Connection, live: sa.ColumnElement[bool]) -> dict[str, Any]:
    d = datasets.c
    rejected = conn.execute(sa.select(d.id, d.name, d.info).where(
        live, d.status == "rejected").order_by(d.created_at, d.id)
        .limit(PROBLEMS_LISTED)).all()
    standing = conn.execute(sa.select(d.id, d.name, d.standout_frames).where(
        live, d.standout_frames > 0).order_by(d.created_at, d.id)
        .limit(PROBLEMS_LISTED)).all()
    failed = conn.execute(sa.select(d.id, d.name).where(
        live, d.status == "failed").order_by(d.created_at, d.id)
        .limit(PROBLEMS_LISTED)).all()
    standing_total = conn.execute(sa.select(sa.func.count()).where(
        live, d.standout_frames > 0)).scalar()
    return {
        "rejected": [{"dataset_id": i, "name": n, "finding": _first_finding(info)}
                     for i, n, info in rejected],
        "standing_out": [{"dataset_id": i, "name": n, "frames": k}
                         for i, n, k in standing],
        "standing_out_count": int(standing_total or 0),
        "failed": [{"dataset_id": i, "name": n} for i, n in failed],
    }


def _range(low: Any, high: Any) -> dict[str, Any] | None:
    if low is None:
        return None
    return {"min": low, "max": high}


def _rate(timeline: list[tuple[str, int]], movies: int, first: str | None,
          last: str | None) -> dict[str, Any]:
    """Movies per 10 minutes: over the whole session (first to last movie, at least one
    bucket long) and bucket by bucket (empty buckets left out)."""
    per = None
    if movies and first and last:
        minutes = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds() / 60
        per = round(movies * RATE_MINUTES / max(minutes, RATE_MINUTES), 3)
    return {"bucket_minutes": RATE_MINUTES, "per_bucket": per,
            "timeline": [{"start": f"{prefix}0:00+00:00", "movies": n}
                         for prefix, n in timeline]}


def _first_finding(info: Any) -> dict[str, Any] | None:
    if isinstance(info, str):  # a JSON column read through a raw select on SQLite
        info = json.loads(info)
    info = info or {}
    # as the dataset's detail shows them (service.api.schemas.dataset_detail)
    findings = info.get("findings", info.get("header_findings")) or []
    errors = [f for f in findings if f.get("severity") == "error"]
    chosen = (errors or findings or [None])[0]
    return chosen


class _Refused(Exception):
    """Rolls a session change back; carries the verdict."""

    def __init__(self, verdict: str):
        super().__init__(verdict)
        self.verdict = verdict


def _new_id() -> str:
    return uuid.uuid4().hex[:20]
