"""Schema migrations (Alembic) for SQLite and PostgreSQL, run when the service starts or
with ``mrc-ingest migrate``.

A catalog made before migrations existed has the tables but no ``alembic_version``: it
is first brought to the baseline (any column an even older release lacked is added, the
SQLite name index created) and stamped, then upgraded like any other. On PostgreSQL an
advisory lock keeps replicas that start together from migrating at the same time; the
second one finds the work done.
"""

from __future__ import annotations

import logging
from importlib import resources

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from .migrations.versions.v0001_baseline import (baseline_metadata, create_sqlite_name_index,
                                                 trigram_available)

log = logging.getLogger("mrc_ingest.catalog")

#: pg_advisory_lock key of the migration lock ("mrci" in ASCII)
MIGRATION_LOCK = 0x6D726369


def alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location",
                           str(resources.files("service.catalog") / "migrations"))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location",
                           str(resources.files("service.catalog") / "migrations"))
    return ScriptDirectory.from_config(config).get_current_head()


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _bring_up_pre_migration_catalog(connection: Connection) -> None:
    """Tables made by the release before migrations: add what an older one lacked, so
    the catalog is exactly the baseline, then stamp it."""
    inspector = sa.inspect(connection)
    for table in baseline_metadata().sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present and column.nullable:
                connection.exec_driver_sql(
                    f"ALTER TABLE {table.name} ADD COLUMN {column.name} "
                    f"{column.type.compile(connection.dialect)}")
        for index in table.indexes:
            index.create(connection, checkfirst=True)
    if connection.dialect.name == "sqlite" and trigram_available(connection):
        create_sqlite_name_index(connection)


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the catalog to the newest schema; (revision before, revision now)."""
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(sa.select(sa.func.pg_advisory_lock(MIGRATION_LOCK)))
            connection.commit()
        try:
            before = current_revision(connection)
            tables = set(sa.inspect(connection).get_table_names())
            config = alembic_config(connection)
            if before is None and "datasets" in tables:
                log.info("catalog from before migrations: bringing it to the baseline")
                _bring_up_pre_migration_catalog(connection)
                connection.commit()
                command.stamp(config, "0001")
                connection.commit()
            command.upgrade(config, "head")
            connection.commit()
            after = current_revision(connection)
        finally:
            if engine.dialect.name == "postgresql":
                connection.execute(sa.select(sa.func.pg_advisory_unlock(MIGRATION_LOCK)))
                connection.commit()
    if before != after:
        log.info("catalog migrated", extra={"from": before, "to": after})
    return before, after
