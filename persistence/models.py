"""SQLAlchemy 2 typed models: roles, API keys, monthly usage, request logs, the completion cache, stored responses.

Table and column names are a contract (the CLI, auth, admission and logging code use them); every constraint
gets a deterministic name from the metadata's naming convention so Alembic migrations stay stable on SQLite
(batch mode) and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime

from advanced_alchemy.types import DateTimeUTC
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = (
    "ApiKey",
    "AppliedWrite",
    "Base",
    "CompletionCache",
    "RequestLog",
    "Role",
    "StoredResponse",
    "UsageMonthly",
    "utcnow",
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an ``INTEGER PRIMARY KEY``; PostgreSQL gets a 64-bit BIGSERIAL.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base whose metadata names every constraint and index."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Role(Base):
    """A named set of limits; ``NULL`` limits are unlimited, ``allowed_models`` ``NULL`` allows every model."""

    __tablename__ = "roles"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(Integer)
    max_concurrency: Mapped[int | None] = mapped_column(Integer)
    monthly_tokens: Mapped[int | None] = mapped_column(BigInteger)
    monthly_requests: Mapped[int | None] = mapped_column(Integer)
    max_tokens: Mapped[int | None] = mapped_column(Integer)
    max_n: Mapped[int | None] = mapped_column(Integer)
    """Most choices one request may ask for (``n`` times the prompts); ``NULL``: the server's own bound."""
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True), default=utcnow, onupdate=utcnow)


class ApiKey(Base):
    """An API key's public metadata and the HMAC digest of its secret (never the secret itself)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(32))
    last4: Mapped[str] = mapped_column(String(4))
    digest: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    role_name: Mapped[str] = mapped_column(String(64), ForeignKey("roles.name"))
    created_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTimeUTC(timezone=True))
    replaced_by_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("api_keys.id"))
    grace_until: Mapped[datetime | None] = mapped_column(DateTimeUTC(timezone=True))


class UsageMonthly(Base):
    """Tokens and requests a key used in one calendar month (``YYYY-MM``, UTC)."""

    __tablename__ = "usage_monthly"

    key_id: Mapped[str] = mapped_column(String(32), ForeignKey("api_keys.id"), primary_key=True)
    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    requests: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))


class RequestLog(Base):
    """One finished request; prompt and output text only when ``STORE_PROMPTS`` is on."""

    __tablename__ = "request_logs"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(128))
    key_id: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(256))
    route: Mapped[str] = mapped_column(String(128))
    method: Mapped[str] = mapped_column(String(8))
    status: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    latency_ms: Mapped[float] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    cached: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    usage_estimated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """The token counts are estimates (a remote model's upstream reported no usage)."""
    error_type: Mapped[str | None] = mapped_column(String(64))
    prompt_text: Mapped[str | None] = mapped_column(Text)
    output_text: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True), default=utcnow, index=True)


class CompletionCache(Base):
    """A cached response body for a deterministic request, scoped per key by the caller's ``cache_key``."""

    __tablename__ = "completion_cache"

    cache_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(256))
    response: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True), index=True)


class AppliedWrite(Base):
    """The id of a write that committed (a writer batch, a quota reservation), so a retry never applies it twice."""

    __tablename__ = "applied_writes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True), default=utcnow, index=True)


class StoredResponse(Base):
    """A ``/v1/responses`` object kept for later reads, its input items and whether its cancellation was asked for.

    ``response`` and ``input_items`` are the JSON the server encoded (the Response object, the array of input
    items); the store never looks inside them. ``key_id`` has no foreign key: static keys have no ``api_keys`` row,
    and every read, delete and cancellation is scoped by it.
    """

    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16))
    """``queued``, ``in_progress``, ``completed``, ``incomplete``, ``failed`` or ``cancelled``."""
    background: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    previous_response_id: Mapped[str | None] = mapped_column(String(64))
    response: Mapped[bytes] = mapped_column(LargeBinary)
    input_items: Mapped[bytes] = mapped_column(LargeBinary)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True), default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True), default=utcnow, onupdate=utcnow)
