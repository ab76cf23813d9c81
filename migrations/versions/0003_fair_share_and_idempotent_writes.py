"""roles.max_n (per-role bound on ``n``) and applied_writes (ids of committed writer batches and reservations).

A write whose answer is lost (a timeout, a dropped connection) may still have committed. Each writer batch and each
quota reservation records its id in ``applied_writes`` inside its own transaction, so a retry can tell whether the
first attempt committed and never applies the same batch twice.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from advanced_alchemy.types import DateTimeUTC
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("roles") as batch:
        batch.add_column(sa.Column("max_n", sa.Integer(), nullable=True))
    op.create_table(
        "applied_writes",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("created_at", DateTimeUTC(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_applied_writes")),
    )
    op.create_index(op.f("ix_applied_writes_created_at"), "applied_writes", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_applied_writes_created_at"), table_name="applied_writes")
    op.drop_table("applied_writes")
    # Not a batch copy of "roles" on SQLite: api_keys references it, and with foreign keys on, dropping the old copy
    # of a referenced table fails. ALTER TABLE ... DROP COLUMN (SQLite 3.35+) changes it in place.
    with op.batch_alter_table("roles", recreate="never") as batch:
        batch.drop_column("max_n")
