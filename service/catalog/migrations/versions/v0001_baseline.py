"""The catalog as it was before Alembic (the last release that created tables itself):
datasets, sidecars, particle sets, tus uploads and jobs, with their indexes, and on
SQLite the FTS5 trigram index of dataset names.

A catalog made by that release has these tables but no ``alembic_version``; the
service brings such a catalog up to this revision (adding any column an even older
release lacked) and stamps it, so upgrades start from here either way.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SQLITE_NAME_INDEX = [
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


def baseline_metadata() -> sa.MetaData:
    """The tables of revision 0001."""
    md = sa.MetaData()
    datasets = sa.Table(
        "datasets", md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("updated_at", sa.String(32), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64)),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("mode", sa.Integer),
        sa.Column("nx", sa.Integer),
        sa.Column("ny", sa.Integer),
        sa.Column("nz", sa.Integer),
        sa.Column("dtype", sa.String(32)),
        sa.Column("pixel_size", sa.Float),
        sa.Column("stored_bytes", sa.BigInteger),
        sa.Column("voltage_kv", sa.Float),
        sa.Column("total_dose", sa.Float),
        sa.Column("info", sa.JSON, nullable=False),
    )
    for cols in (("created_at", "id"), ("status", "created_at", "id"),
                 ("mode", "created_at", "id"), ("source", "created_at", "id"),
                 ("status", "mode", "created_at", "id"),
                 ("status", "source", "created_at", "id"),
                 ("mode", "source", "created_at", "id"), ("name", "id"), ("size_bytes", "id"),
                 ("sha256",), ("voltage_kv", "created_at", "id"), ("total_dose",)):
        sa.Index(f"ix_datasets_{'_'.join(cols)}", *(datasets.c[c] for c in cols))
    sa.Table(
        "sidecars", md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("dataset_id", sa.String(32), index=True),
        sa.Column("created_at", sa.String(32), nullable=False),
    )
    sa.Table(
        "particle_sets", md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("folder", sa.Text, nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("info", sa.JSON, nullable=False),
    )
    sa.Table(
        "tus_uploads", md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("length", sa.BigInteger, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("expires_at", sa.String(32), nullable=False, index=True),
        sa.Column("dataset_id", sa.String(32)),
    )
    sa.Table(
        "jobs", md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("dataset_id", sa.String(32), nullable=False, index=True),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("target", sa.JSON),
        sa.Column("done", sa.Integer, nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("error", sa.JSON),
        sa.Column("result", sa.JSON),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("started_at", sa.String(32)),
        sa.Column("finished_at", sa.String(32)),
    )
    return md


def trigram_available(bind) -> bool:
    """FTS5 with the trigram tokenizer needs SQLite >= 3.34 built with FTS5."""
    try:
        bind.exec_driver_sql("CREATE VIRTUAL TABLE temp.trigram_probe USING "
                             "fts5(x, tokenize='trigram')")
        bind.exec_driver_sql("DROP TABLE temp.trigram_probe")
        return True
    except sa.exc.OperationalError:
        return False


def create_sqlite_name_index(bind) -> None:
    existed = bind.exec_driver_sql(
        "SELECT 1 FROM sqlite_master WHERE name = 'datasets_name'").first()
    for statement in SQLITE_NAME_INDEX:
        bind.exec_driver_sql(statement)
    if not existed:  # rows that were there before the index: index them once
        bind.exec_driver_sql("INSERT INTO datasets_name(datasets_name) VALUES ('rebuild')")


def upgrade() -> None:
    bind = op.get_bind()
    baseline_metadata().create_all(bind)
    if bind.dialect.name == "sqlite" and trigram_available(bind):
        create_sqlite_name_index(bind)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for statement in ("DROP TRIGGER IF EXISTS datasets_name_ai",
                          "DROP TRIGGER IF EXISTS datasets_name_ad",
                          "DROP TRIGGER IF EXISTS datasets_name_au",
                          "DROP TABLE IF EXISTS datasets_name"):
            bind.exec_driver_sql(statement)
    baseline_metadata().drop_all(bind)
