"""Initial schema: roles, api_keys, usage_monthly, request_logs, completion_cache; seed the admin and default roles.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from advanced_alchemy.types import DateTimeUTC
from alembic import context, op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Limits of the seeded ``default`` role when the caller passes none (the settings' defaults).
DEFAULT_ROLE = {"rpm": 60, "tpm": 100_000, "max_concurrency": 8}


def _ts(name: str, *, nullable: bool = False, index: bool = False) -> sa.Column[Any]:
    return sa.Column(name, DateTimeUTC(timezone=True), nullable=nullable, index=index)


def upgrade() -> None:
    roles = op.create_table(
        "roles",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.Integer(), nullable=True),
        sa.Column("max_concurrency", sa.Integer(), nullable=True),
        sa.Column("monthly_tokens", sa.BigInteger(), nullable=True),
        sa.Column("monthly_requests", sa.Integer(), nullable=True),
        sa.Column("max_tokens", sa.Integer(), nullable=True),
        sa.Column("allowed_models", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("is_admin", sa.Boolean(), server_default=sa.false(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_roles")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("last4", sa.String(4), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("role_name", sa.String(64), nullable=False),
        _ts("created_at"),
        _ts("expires_at", nullable=True),
        _ts("revoked_at", nullable=True),
        sa.Column("replaced_by_id", sa.String(32), nullable=True),
        _ts("grace_until", nullable=True),
        sa.ForeignKeyConstraint(["replaced_by_id"], ["api_keys.id"], name=op.f("fk_api_keys_replaced_by_id_api_keys")),
        sa.ForeignKeyConstraint(["role_name"], ["roles.name"], name=op.f("fk_api_keys_role_name_roles")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
    )
    op.create_index(op.f("ix_api_keys_digest"), "api_keys", ["digest"], unique=True)
    op.create_table(
        "usage_monthly",
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("month", sa.String(7), nullable=False),
        sa.Column("tokens", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("requests", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name=op.f("fk_usage_monthly_key_id_api_keys")),
        sa.PrimaryKeyConstraint("key_id", "month", name=op.f("pk_usage_monthly")),
    )
    op.create_table(
        "request_logs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("route", sa.String(128), nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("ttft_ms", sa.Float(), nullable=True),
        sa.Column("finish_reason", sa.String(32), nullable=True),
        sa.Column("cached", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("error_type", sa.String(64), nullable=True),
        sa.Column("prompt_text", sa.Text(), nullable=True),
        sa.Column("output_text", sa.Text(), nullable=True),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_request_logs")),
    )
    op.create_index(op.f("ix_request_logs_created_at"), "request_logs", ["created_at"], unique=False)
    op.create_table(
        "completion_cache",
        sa.Column("cache_key", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("response", sa.LargeBinary(), nullable=False),
        _ts("created_at"),
        _ts("expires_at"),
        sa.PrimaryKeyConstraint("cache_key", name=op.f("pk_completion_cache")),
    )
    op.create_index(op.f("ix_completion_cache_expires_at"), "completion_cache", ["expires_at"], unique=False)

    limits = {**DEFAULT_ROLE, **(context.config.attributes.get("default_role") or {})}
    now = datetime.now(UTC)
    unlimited = {"monthly_tokens": None, "monthly_requests": None, "max_tokens": None}  # allowed_models: NULL
    op.bulk_insert(
        roles,
        [
            {
                "name": "admin",
                **dict.fromkeys(("rpm", "tpm", "max_concurrency"), None),
                **unlimited,
                "is_admin": True,
                "created_at": now,
                "updated_at": now,
            },
            {
                "name": "default",
                "rpm": limits["rpm"],
                "tpm": limits["tpm"],
                "max_concurrency": limits["max_concurrency"],
                **unlimited,
                "is_admin": False,
                "created_at": now,
                "updated_at": now,
            },
        ],
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_completion_cache_expires_at"), table_name="completion_cache")
    op.drop_table("completion_cache")
    op.drop_index(op.f("ix_request_logs_created_at"), table_name="request_logs")
    op.drop_table("request_logs")
    op.drop_table("usage_monthly")
    op.drop_index(op.f("ix_api_keys_digest"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("roles")
