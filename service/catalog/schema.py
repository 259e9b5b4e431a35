"""The catalog's tables: datasets, their sidecars and cached conversions, jobs, resumable
uploads, particle sets. One definition for SQLite and PostgreSQL; Alembic migrations
(``migrations/versions``) bring any older catalog to it.

Times are fixed-width ISO 8601 UTC text (``2026-11-29T00:22:47.123456+00:00``), written
by the database's own clock (:mod:`.clock`), so text order is time order on both
backends and every replica agrees on "now". The JSON column ``info`` holds what only the
detail view needs (header, findings, stats, storage, timings); the other columns are what
lists filter and sort on.
"""

from __future__ import annotations

from typing import NamedTuple

import sqlalchemy as sa

metadata = sa.MetaData()

DATASET_STATES = ("receiving", "queued", "processing", "ready", "rejected", "failed")
#: statuses a re-upload of the same bytes is answered from (no second copy is kept)
LIVE_STATUSES = ("receiving", "queued", "processing", "ready")
#: a dataset being deleted: hidden from every answer; its objects go first, then the row
#: (the maintenance sweep finishes a deletion that was cut off). ARCHITECTURE.md.
TOMBSTONE = "deleting"
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
UNFINISHED_JOB_STATES = ("queued", "running")

datasets = sa.Table(
    "datasets", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),       # upload | registration
    sa.Column("status", sa.String(16), nullable=False),       # DATASET_STATES
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("updated_at", sa.String(32), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),   # the file as received
    sa.Column("sha256", sa.String(64)),
    sa.Column("path", sa.Text, nullable=False),               # registrations: the user's file
    sa.Column("mode", sa.Integer),
    sa.Column("nx", sa.Integer),
    sa.Column("ny", sa.Integer),
    sa.Column("nz", sa.Integer),
    sa.Column("dtype", sa.String(32)),
    sa.Column("pixel_size", sa.Float),                        # Å, X axis
    sa.Column("stored_bytes", sa.BigInteger),                 # everything kept for it
    sa.Column("voltage_kv", sa.Float),
    sa.Column("total_dose", sa.Float),                        # e-/Å², all images
    sa.Column("exposure_s", sa.Float),
    sa.Column("magnification", sa.Float),
    sa.Column("camera", sa.String(64)),
    sa.Column("frame_stats", sa.JSON),                        # per frame mean/std/min/max
    sa.Column("progress", sa.JSON),                           # while in flight, else null
    sa.Column("info", sa.JSON, nullable=False, default=dict),
    sa.Column("session_id", sa.String(32)),                   # sessions.id
    sa.Column("project", sa.String(100)),                     # its session's project
    sa.Column("standout_frames", sa.Integer),                 # frames whose mean stands out
)
# Newest-first listing under any one or two equality filters walks one index in order.
DATASET_INDEXES = (
    ("created_at", "id"), ("status", "created_at", "id"), ("mode", "created_at", "id"),
    ("source", "created_at", "id"), ("status", "mode", "created_at", "id"),
    ("status", "source", "created_at", "id"), ("mode", "source", "created_at", "id"),
    ("name", "id"), ("size_bytes", "id"), ("sha256",), ("voltage_kv", "created_at", "id"),
    ("total_dose",), ("camera", "created_at", "id"), ("pixel_size",), ("exposure_s",),
    ("nz",), ("session_id", "created_at", "id"), ("project", "created_at", "id"))
for _cols in DATASET_INDEXES:
    sa.Index(f"ix_datasets_{'_'.join(_cols)}", *(datasets.c[c] for c in _cols))
#: One live upload per content and project: two uploads of the same bytes to one project
#: committing at the same instant (on one replica or two) cannot both become datasets;
#: another project's copy is its own dataset (a project never learns of another's).
LIVE_UPLOAD_SHA256 = sa.and_(datasets.c.sha256.isnot(None), datasets.c.source == "upload",
                             datasets.c.status.in_(LIVE_STATUSES))
sa.Index("uq_datasets_live_upload_project_sha256", datasets.c.project, datasets.c.sha256,
         unique=True, sqlite_where=LIVE_UPLOAD_SHA256, postgresql_where=LIVE_UPLOAD_SHA256)

#: A facility's microscope session (one grid, one user's project, hours to days) and its
#: figures, kept up to date as its movies land (:meth:`SessionRows.refresh_session`), so
#: lists never aggregate datasets per request. A dataset belongs to one session, a
#: session to one project (its name; unique within the project).
sessions = sa.Table(
    "sessions", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("project", sa.String(100), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),       # how its first movie came
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("updated_at", sa.String(32), nullable=False),
    sa.Column("microscope", sa.String(64)),                   # camera model of its movies
    sa.Column("first_movie_at", sa.String(32)),
    sa.Column("last_movie_at", sa.String(32)),
    sa.Column("movies", sa.Integer, nullable=False, default=0),
    sa.Column("ready", sa.Integer, nullable=False, default=0),
    sa.Column("rejected", sa.Integer, nullable=False, default=0),
    sa.Column("failed", sa.Integer, nullable=False, default=0),
    sa.Column("in_flight", sa.Integer, nullable=False, default=0),
    sa.Column("bytes_received", sa.BigInteger, nullable=False, default=0),
    sa.Column("bytes_stored", sa.BigInteger, nullable=False, default=0),
    sa.Column("summary", sa.JSON, nullable=False, default=dict),  # ranges, rate, problems
    # what the list shows of the summary, kept beside it (a list never reads summary)
    sa.Column("acquisition", sa.JSON),
    sa.Column("rate_per_10_minutes", sa.Float),
    sa.Column("standing_out", sa.Integer, nullable=False, default=0),
)
sa.Index("uq_sessions_project_name", sessions.c.project, sessions.c.name, unique=True)
SESSION_INDEXES = (("last_movie_at", "id"), ("first_movie_at", "id"), ("name", "id"),
                   ("movies", "id"), ("project", "last_movie_at", "id"),
                   ("microscope", "last_movie_at", "id"))
for _cols in SESSION_INDEXES:
    sa.Index(f"ix_sessions_{'_'.join(_cols)}", *(sessions.c[c] for c in _cols))
SESSION_SORT_KEYS = ("last_movie_at", "first_movie_at", "name", "movies")
#: the columns a list of sessions reads
SESSION_LIST_COLUMNS = [c for c in sessions.c if c.name != "summary"]

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
    sa.Column("project", sa.String(100)),                     # a waiting one waits here
)

#: cryoSPARC .cs particle sets (the .cs and its exports live in the datastore)
particle_sets = sa.Table(
    "particle_sets", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("folder", sa.Text, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("info", sa.JSON, nullable=False, default=dict),
    sa.Column("project", sa.String(100)),
)

#: tus resumable uploads: in progress, or finished (completed_at set). With an object
#: store the bytes are the parts of an S3 multipart upload (multipart_id, parts) plus a
#: tail shorter than one part kept as a small object until the next PATCH completes it.
tus_uploads = sa.Table(
    "tus_uploads", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("length", sa.BigInteger, nullable=False),
    sa.Column("offset", sa.BigInteger, nullable=False),
    sa.Column("metadata", sa.JSON, nullable=False, default=dict),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("expires_at", sa.String(32), nullable=False, index=True),
    sa.Column("dataset_id", sa.String(32), index=True),       # reserved at creation
    sa.Column("completed_at", sa.String(32)),                 # set once every byte is in
    sa.Column("multipart_id", sa.Text),                       # S3: the multipart upload
    sa.Column("parts", sa.JSON),                              # S3: [[number, size, etag]]
    sa.Column("pending_bytes", sa.BigInteger, nullable=False, default=0),  # S3: the tail
    sa.Column("pending_key", sa.Text),                        # S3: the tail's object
    sa.Column("released_at", sa.String(32)),                  # its bytes were dropped
    sa.Column("session_id", sa.String(32)),                   # where its dataset goes
    sa.Column("project", sa.String(100)),
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

#: Jobs are rows leased by workers (pgqueuer/river pattern, ARCHITECTURE.md): a worker
#: claims a queued row (or one whose lease expired) with SELECT ... FOR UPDATE SKIP
#: LOCKED, renews the lease while it works, and every renewal and completion is guarded
#: by lease_owner, so a worker that lost its lease writes nothing.
jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),         # upload|ingest|convert|verify
    sa.Column("dataset_id", sa.String(32), nullable=False, index=True),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("target", sa.JSON),                             # convert: the Target fields
    sa.Column("done", sa.BigInteger, nullable=False, default=0),
    sa.Column("total", sa.BigInteger, nullable=False, default=0),
    sa.Column("error", sa.JSON),                              # {"error": code, "detail": ...}
    sa.Column("result", sa.JSON),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("started_at", sa.String(32)),
    sa.Column("finished_at", sa.String(32)),
    sa.Column("priority", sa.Integer, nullable=False, default=100),  # lower runs first
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("max_attempts", sa.Integer, nullable=False, default=3),
    sa.Column("run_after", sa.String(32), nullable=False),    # not before this time
    sa.Column("lease_owner", sa.String(96)),
    sa.Column("lease_expires_at", sa.String(32)),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("dedup_key", sa.String(160)),                   # one unfinished job per key
)
sa.Index("ix_jobs_claim", jobs.c.state, jobs.c.run_after, jobs.c.priority)


class Fence(NamedTuple):
    """A job's lease as one claim holds it: the job, the claiming process and the claim's
    fencing token (its attempt number, which grows with every claim). A write guarded by
    it lands only while that very claim holds the lease: a stale thread, even of the
    same process, that was paused past its lease carries an older token and writes
    nothing (Kleppmann, "How to do distributed locking"; ARCHITECTURE.md)."""

    job_id: str
    owner: str
    attempt: int


def lease_held(fence: Fence) -> sa.ColumnElement[bool]:
    """The claim ``fence`` still holds its job's lease (the guard of fenced writes)."""
    return sa.and_(jobs.c.id == fence.job_id, jobs.c.lease_owner == fence.owner,
                   jobs.c.attempts == fence.attempt, jobs.c.state == "running")
UNFINISHED_DEDUP = sa.and_(jobs.c.dedup_key.isnot(None),
                           jobs.c.state.in_(UNFINISHED_JOB_STATES))
sa.Index("uq_jobs_unfinished_dedup", jobs.c.dataset_id, jobs.c.dedup_key, unique=True,
         sqlite_where=UNFINISHED_DEDUP, postgresql_where=UNFINISHED_DEDUP)

SORT_KEYS = ("created_at", "name", "size_bytes")
SUMMARY_COLUMNS = [c for c in datasets.c if c.name not in ("info", "path", "frame_stats")]
#: the dataset columns a session's figures are made of: a write of any of them refreshes
#: its session
SESSION_FIGURE_COLUMNS = frozenset({
    "status", "size_bytes", "stored_bytes", "voltage_kv", "pixel_size", "total_dose",
    "exposure_s", "nz", "camera", "standout_frames", "session_id"})
#: columns a detail read needs (the per-frame statistics have their own endpoint)
DETAIL_COLUMNS = [c for c in datasets.c if c.name != "frame_stats"]
