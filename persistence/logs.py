"""The request log (bulk inserts of cleaned rows, chunked retention) and the completion cache."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import partial
from typing import Any, cast

from sqlalchemy import BigInteger, Column, Float, Integer, String, Table, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from persistence._sql import delete_in_chunks, dialect_insert
from persistence.models import CompletionCache, RequestLog, utcnow

__all__ = (
    "REQUEST_LOG_FIELDS",
    "cache_get",
    "cache_purge_expired",
    "cache_put",
    "clean_request_log_row",
    "delete_request_logs_before",
    "insert_request_logs",
)

_LOG_DEFAULTS: dict[str, Any] = {
    "key_id": None,
    "model": None,
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "ttft_ms": None,
    "finish_reason": None,
    "cached": False,
    "usage_estimated": False,
    "error_type": None,
    "prompt_text": None,
    "output_text": None,
}
_LOG_REQUIRED = frozenset({"request_id", "route", "method", "status", "latency_ms"})
REQUEST_LOG_FIELDS = frozenset(_LOG_DEFAULTS) | _LOG_REQUIRED | {"created_at"}
"""Keys a request-log row may have (``id`` is assigned by the database)."""


def _clean_text(limit: int | None, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if "\x00" in value:  # PostgreSQL text cannot hold NUL
        value = value.replace("\x00", "")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no driver can encode it
            value = value.encode("utf-8", "replace").decode("utf-8")
    if limit is not None and len(value) > limit:
        value = value[:limit]
    return value


def _clamp(low: int, high: int, value: Any) -> Any:
    return value if value is None else min(max(int(value), low), high)


def _finite(nullable: bool, value: Any) -> Any:
    if value is None or math.isfinite(value):
        return value
    return None if nullable else 0.0  # SQLite stores NaN as NULL; no backend should receive it


def _cleaner(column: Column[Any]) -> Callable[[Any], Any] | None:
    kind = column.type
    if isinstance(kind, String):  # Text too (length None)
        return partial(_clean_text, kind.length)
    if isinstance(kind, BigInteger):
        return partial(_clamp, -(2**63), 2**63 - 1)
    if isinstance(kind, Integer):
        return partial(_clamp, -(2**31), 2**31 - 1)
    if isinstance(kind, Float):
        return partial(_finite, bool(column.nullable))
    return None


_CLEANERS: dict[str, Callable[[Any], Any]] = {
    c.name: f for c in cast("Table", RequestLog.__table__).columns if (f := _cleaner(c)) is not None
}


def clean_request_log_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` made storable whatever a client sent: NUL characters stripped and lone surrogates replaced in every
    string, strings cut to their column's length, integers clamped to their column's range, non-finite floats
    dropped (``NULL``, or 0 where the column needs a value). PostgreSQL rejects all of these; SQLite some."""
    cleaned = dict(row)
    for name, value in row.items():
        clean = _CLEANERS.get(name)
        if clean is not None:
            cleaned[name] = clean(value)
    return cleaned


async def insert_request_logs(session: AsyncSession, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert request-log rows, cleaned (:func:`clean_request_log_row`), in one bulk ``INSERT``; the caller commits.

    Each row needs ``request_id``, ``route``, ``method``, ``status`` and ``latency_ms``; other fields default
    (``created_at`` to now, counts to 0, text to ``NULL``).

    Raises:
        ValueError: a row misses a required field or has an unknown one.
    """
    if not rows:
        return
    now = utcnow()
    values: list[dict[str, Any]] = []
    for row in rows:
        unknown = row.keys() - REQUEST_LOG_FIELDS
        missing = _LOG_REQUIRED - row.keys()
        if unknown or missing:
            raise ValueError(f"request log row: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
        values.append(clean_request_log_row({**_LOG_DEFAULTS, "created_at": now, **row}))
    # A Core insert of the table (executemany), not the ORM bulk path: ~10x less Python per row.
    table = cast("Table", RequestLog.__table__)
    await session.execute(insert(table), values)


async def delete_request_logs_before(session: AsyncSession, cutoff: datetime, chunk_size: int = 1000) -> int:
    """Delete request logs created before ``cutoff``, ``chunk_size`` rows per committed transaction.

    Small chunks keep each write lock short, so request handlers that log concurrently are never stalled for
    long. Anything pending on ``session`` is committed with the first chunk.

    Returns:
        How many rows were deleted.
    """
    return await delete_in_chunks(session, RequestLog, RequestLog.id, RequestLog.created_at < cutoff, chunk_size)


async def cache_get(session: AsyncSession, cache_key: str, now: datetime) -> bytes | None:
    """The cached response for ``cache_key`` unless it expired at ``now``."""
    query = select(CompletionCache.response).where(
        CompletionCache.cache_key == cache_key, CompletionCache.expires_at > now
    )
    response: bytes | None = await session.scalar(query)
    return response


async def cache_put(
    session: AsyncSession, cache_key: str, key_id: str, model: str, response: bytes, expires_at: datetime
) -> None:
    """Store (or replace) a cached response; the caller commits."""
    stmt = dialect_insert(session, CompletionCache).values(
        cache_key=cache_key,
        key_id=key_id,
        model=model,
        response=response,
        created_at=utcnow(),
        expires_at=expires_at,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["cache_key"],
        set_={
            "key_id": stmt.excluded.key_id,
            "model": stmt.excluded.model,
            "response": stmt.excluded.response,
            "created_at": stmt.excluded.created_at,
            "expires_at": stmt.excluded.expires_at,
        },
    )
    await session.execute(stmt)


async def cache_purge_expired(session: AsyncSession, now: datetime, chunk_size: int = 1000) -> int:
    """Delete every entry expired at ``now``, ``chunk_size`` rows per committed transaction; returns how many."""
    expired = CompletionCache.expires_at <= now
    return await delete_in_chunks(session, CompletionCache, CompletionCache.cache_key, expired, chunk_size)
