"""Sessions and projects: a dataset belongs to one session, a session to one project;
particle sets and resumable uploads carry their project too (tokens scoped to projects).

Datasets from before this revision go to project ``default``, session
``<source>-<UTC date of arrival>`` (the rule for a movie sent without one); their
sessions' figures are computed here, in the same transaction
(:func:`service.catalog.sessions.write_figures`): a catalog from before migrations
(no revision yet) gets them too.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import json
import uuid

import sqlalchemy as sa
from alembic import op

from service.catalog.clock import db_now
from service.catalog.sessions import standout_frames, write_figures

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

LIVE_UPLOAD = ("sha256 IS NOT NULL AND source = 'upload' AND status IN "
               "('receiving', 'queued', 'processing', 'ready')")
DATASET_INDEXES = (("session_id", "created_at", "id"), ("project", "created_at", "id"))
SESSION_INDEXES = (("last_movie_at", "id"), ("first_movie_at", "id"), ("name", "id"),
                   ("movies", "id"), ("project", "last_movie_at", "id"),
                   ("microscope", "last_movie_at", "id"))


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("project", sa.String(100), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("updated_at", sa.String(32), nullable=False),
        sa.Column("microscope", sa.String(64)),
        sa.Column("first_movie_at", sa.String(32)),
        sa.Column("last_movie_at", sa.String(32)),
        sa.Column("movies", sa.Integer, nullable=False, server_default="0"),
        sa.Column("ready", sa.Integer, nullable=False, server_default="0"),
        sa.Column("rejected", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("in_flight", sa.Integer, nullable=False, server_default="0"),
        sa.Column("bytes_received", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("bytes_stored", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("summary", sa.JSON, nullable=False),
        sa.Column("acquisition", sa.JSON),
        sa.Column("rate_per_10_minutes", sa.Float),
        sa.Column("standing_out", sa.Integer, nullable=False, server_default="0"))
    op.create_index("uq_sessions_project_name", "sessions", ["project", "name"], unique=True)
    for cols in SESSION_INDEXES:
        op.create_index(f"ix_sessions_{'_'.join(cols)}", "sessions", list(cols))
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("session_id", sa.String(32)))
        batch.add_column(sa.Column("project", sa.String(100)))
        batch.add_column(sa.Column("standout_frames", sa.Integer))
    for cols in DATASET_INDEXES:
        op.create_index(f"ix_datasets_{'_'.join(cols)}", "datasets", list(cols))
    for table in ("particle_sets", "sidecars"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("project", sa.String(100)))
    with op.batch_alter_table("tus_uploads") as batch:
        batch.add_column(sa.Column("session_id", sa.String(32)))
        batch.add_column(sa.Column("project", sa.String(100)))
    _derived_columns(op.get_bind())
    _sessions_for_existing(op.get_bind())
    # uploads are deduplicated within a project now
    dialect = op.get_bind().dialect.name
    op.drop_index("uq_datasets_live_upload_sha256", "datasets")
    op.create_index("uq_datasets_live_upload_project_sha256", "datasets",
                    ["project", "sha256"], unique=True,
                    **{f"{dialect}_where": sa.text(LIVE_UPLOAD)})


def _json(value):
    return json.loads(value) if isinstance(value, str) else value


def _derived_columns(bind, batch: int = 2000) -> None:
    """What this revision's rules derive from what older ones stored, for the datasets
    already there: ``standout_frames`` from their per-frame means, and a pixel size that
    was only a placeholder (1 Å, DE's negative cell) made unknown: a stand-in is never a
    value (it stays listed in ``acquisition.pixel_size_sources``)."""
    after = ""
    while True:
        rows = bind.execute(sa.text(
            "SELECT id, frame_stats, info FROM datasets WHERE id > :after ORDER BY id "
            "LIMIT :batch"), {"after": after, "batch": batch}).all()
        for dataset_id, frame_stats, info in rows:
            changes: dict = {}
            stats = _json(frame_stats)
            if stats:
                changes["standout_frames"] = len(standout_frames(stats.get("mean")))
            info = _json(info) or {}
            acquisition = info.get("acquisition") or {}
            sources = acquisition.get("pixel_size_sources") or []
            if sources and sources[0].get("placeholder"):
                acquisition.pop("pixel_size_angstrom", None)
                changes["pixel_size"] = None
                changes["info"] = json.dumps(info)
            if changes:
                sets = ", ".join(f"{k} = :{k}" for k in changes)
                bind.execute(sa.text(f"UPDATE datasets SET {sets} WHERE id = :id"),
                             {**changes, "id": dataset_id})
        if len(rows) < batch:
            return
        after = rows[-1][0]


def _sessions_for_existing(bind) -> None:
    for table in ("particle_sets", "tus_uploads", "sidecars"):
        op.execute(f"UPDATE {table} SET project = 'default'")
    groups = bind.execute(sa.text(
        "SELECT source, substr(created_at, 1, 10) AS day, min(created_at) FROM datasets "
        "GROUP BY source, substr(created_at, 1, 10)")).all()
    for source, day, first in groups:
        session_id = uuid.uuid4().hex[:20]
        bind.execute(sa.text(
            "INSERT INTO sessions (id, name, project, source, created_at, updated_at, "
            "summary) VALUES (:id, :name, 'default', :source, :first, :first, '{}')"),
            {"id": session_id, "name": f"{source}-{day}", "source": source, "first": first})
        bind.execute(sa.text(  # a range of the (source, created_at) index, not a scan
            "UPDATE datasets SET session_id = :id, project = 'default' "
            "WHERE source = :source AND created_at >= :start AND created_at < :stop"),
            {"id": session_id, "source": source, "start": f"{day}T", "stop": f"{day}U"})
        write_figures(bind, session_id, db_now(bind.dialect.name))
    # A resumable upload goes where its dataset is; one whose movie has not arrived yet
    # (no dataset) to upload-<UTC date it was created>, as one created now without a
    # session would: its dataset, made when the movie lands, takes the upload's session.
    for upload_id, day, created, dataset_id in bind.execute(sa.text(
            "SELECT id, substr(created_at, 1, 10), created_at, dataset_id "
            "FROM tus_uploads")).all():
        session_id = bind.execute(sa.text("SELECT session_id FROM datasets WHERE id = :id"),
                                  {"id": dataset_id}).scalar()
        if session_id is None:
            name = f"upload-{day}"
            session_id = bind.execute(sa.text(
                "SELECT id FROM sessions WHERE project = 'default' AND name = :name"),
                {"name": name}).scalar()
            if session_id is None:
                session_id = uuid.uuid4().hex[:20]
                bind.execute(sa.text(
                    "INSERT INTO sessions (id, name, project, source, created_at, "
                    "updated_at, summary) VALUES (:id, :name, 'default', 'upload', "
                    ":created, :created, '{}')"),
                    {"id": session_id, "name": name, "created": created})
        bind.execute(sa.text("UPDATE tus_uploads SET session_id = :session WHERE id = :id"),
                     {"session": session_id, "id": upload_id})


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.drop_index("uq_datasets_live_upload_project_sha256", "datasets")
    op.create_index("uq_datasets_live_upload_sha256", "datasets", ["sha256"], unique=True,
                    **{f"{dialect}_where": sa.text(LIVE_UPLOAD)})
    for cols in DATASET_INDEXES:
        op.drop_index(f"ix_datasets_{'_'.join(cols)}", "datasets")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("standout_frames")
        batch.drop_column("project")
        batch.drop_column("session_id")
    for table in ("particle_sets", "sidecars", "tus_uploads"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("project")
    with op.batch_alter_table("tus_uploads") as batch:
        batch.drop_column("session_id")
    op.drop_table("sessions")
