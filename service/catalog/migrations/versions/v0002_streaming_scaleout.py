"""Streaming ingest and scale-out: acquisition and progress columns, per-frame
statistics, conversions kept in the datastore (and counted), tus state for an object
store, leased jobs, one live upload per content, keys instead of paths, and on
PostgreSQL a pg_trgm index for name search.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import logging
import posixpath

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

LIVE = ("receiving", "queued", "processing", "ready")
NEW_DATASET_COLUMNS = (("exposure_s", sa.Float), ("magnification", sa.Float),
                       ("camera", sa.String(64)), ("frame_stats", sa.JSON),
                       ("progress", sa.JSON))
NEW_DATASET_INDEXES = (("camera", "created_at", "id"), ("pixel_size",), ("exposure_s",),
                       ("nz",))


def _where(dialect: str, clause: str) -> dict:
    return {f"{dialect}_where": sa.text(clause)}


def upgrade() -> None:
    bind = op.get_bind()
    dialect = bind.dialect.name
    with op.batch_alter_table("datasets") as batch:
        for name, kind in NEW_DATASET_COLUMNS:
            batch.add_column(sa.Column(name, kind))
    for cols in NEW_DATASET_INDEXES:
        op.create_index(f"ix_datasets_{'_'.join(cols)}", "datasets", list(cols))
    _keys_instead_of_paths(bind)
    _retire_duplicate_uploads(bind)
    live = "sha256 IS NOT NULL AND source = 'upload' AND status IN ('" + "', '".join(LIVE) + "')"
    op.create_index("uq_datasets_live_upload_sha256", "datasets", ["sha256"], unique=True,
                    **_where(dialect, live))

    with op.batch_alter_table("tus_uploads") as batch:
        batch.add_column(sa.Column("completed_at", sa.String(32)))
        batch.add_column(sa.Column("multipart_id", sa.Text))
        batch.add_column(sa.Column("parts", sa.JSON))
        batch.add_column(sa.Column("pending_bytes", sa.BigInteger, nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("pending_key", sa.Text))
    op.create_index("ix_tus_uploads_dataset_id", "tus_uploads", ["dataset_id"])
    # Before, a finished upload was one with its dataset set.
    op.execute("UPDATE tus_uploads SET completed_at = created_at WHERE dataset_id IS NOT NULL")

    op.create_table(
        "conversions",
        sa.Column("dataset_id", sa.String(32), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("used_at", sa.String(32), nullable=False),
    )
    op.create_index("ix_conversions_used_at", "conversions", ["used_at"])

    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("done", type_=sa.BigInteger, existing_nullable=False)
        batch.alter_column("total", type_=sa.BigInteger, existing_nullable=False)
        batch.add_column(sa.Column("priority", sa.Integer, nullable=False,
                                   server_default="100"))
        batch.add_column(sa.Column("attempts", sa.Integer, nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("max_attempts", sa.Integer, nullable=False,
                                   server_default="3"))
        batch.add_column(sa.Column("run_after", sa.String(32), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("lease_owner", sa.String(96)))
        batch.add_column(sa.Column("lease_expires_at", sa.String(32)))
        batch.add_column(sa.Column("cancel_requested", sa.Boolean, nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("dedup_key", sa.String(160)))
    # Jobs that were queued or running when the old service stopped run again.
    op.execute("UPDATE jobs SET run_after = created_at")
    op.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'")
    op.create_index("ix_jobs_claim", "jobs", ["state", "run_after", "priority"])
    op.create_index("uq_jobs_unfinished_dedup", "jobs", ["dataset_id", "dedup_key"],
                    unique=True,
                    **_where(dialect, "dedup_key IS NOT NULL AND state IN ('queued', "
                                      "'running')"))
    if dialect == "postgresql":
        _trigram_index(bind)


def _keys_instead_of_paths(bind) -> None:
    """Uploads kept the file as received at an absolute path inside the data folder;
    the catalog now names datastore keys instead (a registration's path is the user's
    file and stays)."""
    rows = bind.execute(sa.text("SELECT id, name, status, path, info FROM datasets "
                                "WHERE source = 'upload'")).mappings().all()
    for row in rows:
        info = row["info"]
        info = info if isinstance(info, dict) else __import__("json").loads(info or "{}")
        if "storage" in info:
            continue
        keys = {}
        if row["path"]:
            keys["original"] = f"datasets/{row['id']}/{posixpath.basename(row['path'])}"
        archive = info.get("archive") or {}
        if (archive.get("codec") or "none") != "none":
            keys["archive"] = f"datasets/{row['id']}/archive.mrcz"
        if row["status"] == "ready":
            keys["sum"] = f"datasets/{row['id']}/sum.npy"
        info["storage"] = {"form": "legacy", "keys": keys, "bytes": {}}
        bind.execute(sa.text("UPDATE datasets SET path = '', info = :info WHERE id = :id")
                     .bindparams(sa.bindparam("info", type_=sa.JSON)),
                     {"info": info, "id": row["id"]})


def _retire_duplicate_uploads(bind) -> None:
    """Before the unique index, two uploads of the same bytes could both become
    datasets when they committed at the same instant. The oldest stays; later ones are
    marked failed with the reason (their data are kept; an admin may delete them)."""
    live = "', '".join(LIVE)
    rows = bind.execute(sa.text(
        "SELECT id, sha256, info FROM datasets WHERE source = 'upload' AND sha256 IS NOT "
        f"NULL AND status IN ('{live}') ORDER BY sha256, created_at, id")).mappings().all()
    first: dict[str, str] = {}
    for row in rows:
        if row["sha256"] not in first:
            first[row["sha256"]] = row["id"]
            continue
        info = row["info"]
        info = info if isinstance(info, dict) else __import__("json").loads(info or "{}")
        info["error"] = {"error": "duplicate", "detail": f"the same bytes as dataset "
                         f"{first[row['sha256']]} (found when the catalog was upgraded)"}
        bind.execute(sa.text("UPDATE datasets SET status = 'failed', info = :info "
                             "WHERE id = :id").bindparams(sa.bindparam("info", type_=sa.JSON)),
                     {"info": info, "id": row["id"]})


def _trigram_index(bind) -> None:
    """pg_trgm serves case-insensitive substring search (ILIKE '%x%') from a GIN index.
    Creating the extension needs the right to; without it, search still works, slower."""
    try:
        with bind.begin_nested():
            bind.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except sa.exc.DBAPIError as exc:
        log.warning("pg_trgm is not available (%s); name search will not be indexed", exc)
        return
    bind.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_datasets_name_trgm ON datasets "
                         "USING gin (name gin_trgm_ops)")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        bind.exec_driver_sql("DROP INDEX IF EXISTS ix_datasets_name_trgm")
    op.drop_index("uq_jobs_unfinished_dedup", table_name="jobs")
    op.drop_index("ix_jobs_claim", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for name in ("dedup_key", "cancel_requested", "lease_expires_at", "lease_owner",
                     "run_after", "max_attempts", "attempts", "priority"):
            batch.drop_column(name)
    op.drop_index("ix_conversions_used_at", table_name="conversions")
    op.drop_table("conversions")
    op.drop_index("ix_tus_uploads_dataset_id", table_name="tus_uploads")
    with op.batch_alter_table("tus_uploads") as batch:
        for name in ("pending_key", "pending_bytes", "parts", "multipart_id", "completed_at"):
            batch.drop_column(name)
    op.drop_index("uq_datasets_live_upload_sha256", table_name="datasets")
    for cols in NEW_DATASET_INDEXES:
        op.drop_index(f"ix_datasets_{'_'.join(cols)}", table_name="datasets")
    with op.batch_alter_table("datasets") as batch:
        for name, _ in NEW_DATASET_COLUMNS:
            batch.drop_column(name)
