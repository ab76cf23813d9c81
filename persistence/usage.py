"""Monthly quotas, exact under concurrency: one conditional ``UPDATE`` decides each reservation.

The database, not the application, compares usage with the limit: ``UPDATE ... SET tokens = tokens + :t
WHERE ... AND tokens + :t <= :limit`` either matches the row or not, atomically on both SQLite (one writer at a
time) and PostgreSQL (the row lock makes a concurrent updater re-check the condition on the new row version).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from persistence._sql import dialect_insert, own_transaction, rowcount
from persistence.models import UsageMonthly
from persistence.records import UsageRecord

__all__ = ("add_usage", "adjust_usage", "get_usage", "reserve_usage")


async def _ensure_row(session: AsyncSession, key_id: str, month: str) -> None:
    stmt = (
        dialect_insert(session, UsageMonthly)
        .values(key_id=key_id, month=month, tokens=0, requests=0)
        .on_conflict_do_nothing(index_elements=["key_id", "month"])
    )
    await session.execute(stmt)


async def reserve_usage(
    session: AsyncSession,
    key_id: str,
    month: str,
    tokens: int,
    *,
    max_tokens_per_month: int | None,
    max_requests_per_month: int | None,
) -> bool:
    """Count one request and ``tokens`` against ``key_id``'s ``month`` if both stay within the limits.

    Runs as its own short transaction and commits it (anything pending on ``session`` is committed first).

    Args:
        session: Any session; use a fresh one per call when calling concurrently.
        key_id: The key's public id.
        month: ``YYYY-MM`` (UTC).
        tokens: Tokens to reserve (typically prompt tokens + ``max_tokens``), reconciled later with
            :func:`adjust_usage`.
        max_tokens_per_month: Token limit, ``None`` for unlimited.
        max_requests_per_month: Request limit, ``None`` for unlimited.

    Returns:
        Whether the reservation was made; ``False`` leaves the usage unchanged.
    """
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    new_tokens = UsageMonthly.tokens + tokens
    stmt: Any = (
        update(UsageMonthly)
        .where(UsageMonthly.key_id == key_id, UsageMonthly.month == month)
        .values(tokens=new_tokens, requests=UsageMonthly.requests + 1)
        .execution_options(synchronize_session=False)
    )
    if max_tokens_per_month is not None:
        stmt = stmt.where(new_tokens <= max_tokens_per_month)
    if max_requests_per_month is not None:
        stmt = stmt.where(UsageMonthly.requests + 1 <= max_requests_per_month)

    async def work() -> bool:
        await _ensure_row(session, key_id, month)
        return rowcount(await session.execute(stmt)) == 1

    return await own_transaction(session, work)


async def add_usage(session: AsyncSession, key_id: str, month: str, tokens: int, requests: int = 0) -> None:
    """Add ``tokens`` and ``requests`` to a month's usage in one upsert, never below zero; the caller commits.

    For usage counted after the fact (e.g. a batched writer); quota admission uses :func:`reserve_usage`.
    """
    table = UsageMonthly.__table__
    stmt = dialect_insert(session, UsageMonthly).values(
        key_id=key_id, month=month, tokens=max(tokens, 0), requests=max(requests, 0)
    )
    new_tokens = table.c.tokens + tokens
    new_requests = table.c.requests + requests
    stmt = stmt.on_conflict_do_update(
        index_elements=["key_id", "month"],
        set_={
            "tokens": case((new_tokens < 0, 0), else_=new_tokens),
            "requests": case((new_requests < 0, 0), else_=new_requests),
        },
    )
    await session.execute(stmt)


async def adjust_usage(
    session: AsyncSession, key_id: str, month: str, delta_tokens: int, *, delta_requests: int = 0
) -> None:
    """Add ``delta_tokens`` (negative to give back) and ``delta_requests`` to a month's usage, never below zero.

    Used to reconcile a reservation with the tokens actually used, or (``delta_requests=-1``) to refund a
    request that never ran. Runs as its own transaction and commits it.
    """
    await own_transaction(session, lambda: add_usage(session, key_id, month, delta_tokens, delta_requests))


async def get_usage(session: AsyncSession, key_id: str | None, month: str) -> list[UsageRecord]:
    """Usage of one key (or of every key with usage, ``key_id=None``) in ``month``, by key id."""
    query = (
        select(UsageMonthly)
        .where(UsageMonthly.month == month)
        .order_by(UsageMonthly.key_id)
        # The counters change through bulk UPDATEs; never trust a copy already in the identity map.
        .execution_options(populate_existing=True)
    )
    if key_id is not None:
        query = query.where(UsageMonthly.key_id == key_id)
    return [UsageRecord.from_orm(row) for row in await session.scalars(query)]
