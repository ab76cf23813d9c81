"""responses: stored ``/v1/responses`` objects, their input items and cancellation requests, scoped by API key.

``key_id`` references no table: static keys have no ``api_keys`` row. The ``created_at`` index serves the
retention pass, which deletes old responses in small chunks like request-log rows.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from advanced_alchemy.types import DateTimeUTC
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("background", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("previous_response_id", sa.String(64), nullable=True),
        sa.Column("response", sa.LargeBinary(), nullable=False),
        sa.Column("input_items", sa.LargeBinary(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", DateTimeUTC(timezone=True), nullable=False),
        sa.Column("updated_at", DateTimeUTC(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_responses")),
    )
    op.create_index(op.f("ix_responses_created_at"), "responses", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_responses_created_at"), table_name="responses")
    op.drop_table("responses")
