"""Alembic environment: migrations run on the connection :mod:`service.catalog.migrate`
hands over (it holds the lock that keeps two starting replicas from migrating at once)."""

from __future__ import annotations

from alembic import context

from service.catalog.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
