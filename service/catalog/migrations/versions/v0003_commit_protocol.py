"""The commit protocol: a resumable upload records when its bytes were released (dropped
once its dataset was committed; recovery releases those a crash left).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tus_uploads") as batch:
        batch.add_column(sa.Column("released_at", sa.String(32)))
    # Uploads finished before this revision had their bytes dropped as they finished.
    op.execute("UPDATE tus_uploads SET released_at = completed_at "
               "WHERE completed_at IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("tus_uploads") as batch:
        batch.drop_column("released_at")
