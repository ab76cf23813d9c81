"""Monthly quotas, exact under concurrency: one conditional upsert decides each reservation.

The database, not the application, compares usage with the limit: ``INSERT ... ON CONFLICT DO UPDATE SET tokens =
tokens + :t WHERE tokens + :t <= :limit`` either changes the row or not, atomically on both SQLite (one writer at a
time) and PostgreSQL (the conflicting row is locked and the condition re-checked on its newest version).

Writes whose answer can be lost (a timeout, a dropped connection: they may still have committed) record an id in
``applied_writes`` in the same transaction, so a retry or an undo knows whether they were applied:
:func:`mark_applied` for batches, ``write_id`` of :func:`reserve_usage` with :func:`undo_reservation` for
reservations.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, and_, bindparam, case, func, insert, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import asyncpg as pg_asyncpg  # the dialect (SQL it renders), not the driver
from sqlalchemy.ext.asyncio import AsyncSession

from persistence._sql import delete_in_chunks, dialect_insert, dialect_name, own_transaction, rowcount
from persistence.models import AppliedWrite, UsageMonthly, utcnow
from persistence.records import UsageRecord

__all__ = (
    "PgReservation",
    "add_usage",
    "adjust_usage",
    "delete_applied_writes_before",
    "get_usage",
    "mark_applied",
    "pg_reservation",
    "reserve_usage",
    "undo_reservation",
)


async def reserve_usage(
    session: AsyncSession,
    key_id: str,
    month: str,
    tokens: int,
    *,
    max_tokens_per_month: int | None,
    max_requests_per_month: int | None,
    write_id: str | None = None,
    requests: int = 1,
) -> bool:
    """Count ``requests`` (one request, or a lease of several) and ``tokens`` against ``key_id``'s ``month`` if both
    stay within the limits.

    Runs as its own short transaction and commits it (anything pending on ``session`` is committed first). On
    PostgreSQL it is a single statement, atomic by itself (so it may run on an autocommit connection).

    Args:
        session: Any session; use a fresh one per call when calling concurrently.
        key_id: The key's public id.
        month: ``YYYY-MM`` (UTC).
        tokens: Tokens to reserve (typically prompt tokens + ``max_tokens``), reconciled later with
            :func:`adjust_usage`.
        max_tokens_per_month: Token limit, ``None`` for unlimited.
        max_requests_per_month: Request limit, ``None`` for unlimited.
        write_id: When given, a reservation that is made records this id in ``applied_writes`` in the same
            transaction (at most 64 characters), so that :func:`undo_reservation` can give it back exactly once
            if its caller never learnt the outcome.
        requests: Requests to count (0: tokens only, e.g. more tokens for a lease that holds a request).

    Returns:
        Whether the reservation was made; ``False`` leaves the usage unchanged.
    """
    if never_fits(tokens, max_tokens_per_month, max_requests_per_month, requests):
        return False
    if dialect_name(session) == "postgresql":
        limited = (max_tokens_per_month is not None, max_requests_per_month is not None)
        stmt = _pg_reservation(*limited, marked=write_id is not None)
        params = _reservation_values(
            key_id, month, tokens, write_id, max_tokens_per_month, max_requests_per_month, requests
        )
        return await own_transaction(session, lambda: _scalar_is_one(session, stmt, params))
    conditions = []
    if max_tokens_per_month is not None:
        conditions.append(UsageMonthly.tokens + tokens <= max_tokens_per_month)
    if max_requests_per_month is not None:
        conditions.append(UsageMonthly.requests + requests <= max_requests_per_month)
    upsert = (
        dialect_insert(session, UsageMonthly)
        .values(key_id=key_id, month=month, tokens=tokens, requests=requests)
        .on_conflict_do_update(
            index_elements=["key_id", "month"],
            set_={"tokens": UsageMonthly.tokens + tokens, "requests": UsageMonthly.requests + requests},
            where=and_(*conditions) if conditions else None,
        )
    )

    async def work() -> bool:
        made = rowcount(await session.execute(upsert)) == 1  # not RETURNING on SQLite: see _claim
        if made and write_id is not None:
            await session.execute(insert(AppliedWrite).values(id=write_id, created_at=utcnow()))
        return made

    return await own_transaction(session, work)


def never_fits(
    tokens: int, max_tokens_per_month: int | None, max_requests_per_month: int | None, requests: int = 1
) -> bool:
    """Whether a reservation of ``tokens`` and ``requests`` can be refused without asking the database (a month's
    first reservation inserts its row unchecked, so what could never fit is refused here)."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    if requests < 0:
        raise ValueError(f"requests must be >= 0, got {requests}")
    return (max_tokens_per_month is not None and tokens > max_tokens_per_month) or (
        max_requests_per_month is not None and requests > max_requests_per_month
    )


class PgReservation:
    """The PostgreSQL reservation of :func:`reserve_usage` (``write_id`` marked) as SQL text for asyncpg itself.

    The same statement, compiled once per combination of limits: for a caller that runs it on a raw asyncpg
    connection, where SQLAlchemy's session, connection and result layers cost several times the statement itself.
    :meth:`args` orders the values as the text numbers them; ``fetchval`` returns 1 (reserved) or 0.
    """

    def __init__(self, limit_tokens: bool, limit_requests: bool) -> None:
        compiled = _pg_reservation(limit_tokens, limit_requests, marked=True).compile(dialect=pg_asyncpg.dialect())  # type: ignore[no-untyped-call]
        self.sql = str(compiled)
        self._order: tuple[str, ...] = tuple(compiled.positiontup or ())
        self._constants: dict[str, Any] = dict(compiled.params)

    def args(
        self,
        key_id: str,
        month: str,
        tokens: int,
        write_id: str,
        max_tokens_per_month: int | None,
        max_requests_per_month: int | None,
        requests: int = 1,
    ) -> list[Any]:
        values = _reservation_values(
            key_id, month, tokens, write_id, max_tokens_per_month, max_requests_per_month, requests
        )
        return [values[name] if name in values else self._constants[name] for name in self._order]


def _reservation_values(
    key_id: str,
    month: str,
    tokens: int,
    write_id: str | None,
    max_tokens_per_month: int | None,
    max_requests_per_month: int | None,
    requests: int,
) -> dict[str, Any]:
    """The bound values of the PostgreSQL reservation statement, by name."""
    return {
        "key_id": key_id,
        "month": month,
        "tokens": tokens,
        "requests": requests,
        "max_tokens": max_tokens_per_month,
        "max_requests": max_requests_per_month,
        "write_id": write_id,
        "now": utcnow(),
    }


_PG_TEXTS: dict[tuple[bool, bool], PgReservation] = {}


def pg_reservation(max_tokens_per_month: int | None, max_requests_per_month: int | None) -> PgReservation:
    """The :class:`PgReservation` for these limits (built once)."""
    key = (max_tokens_per_month is not None, max_requests_per_month is not None)
    found = _PG_TEXTS.get(key)
    if found is None:
        found = _PG_TEXTS[key] = PgReservation(*key)
    return found


async def _scalar_is_one(session: AsyncSession, stmt: Any, params: dict[str, Any]) -> bool:
    return bool((await session.execute(stmt, params)).scalar_one() == 1)


_PG_RESERVATIONS: dict[tuple[bool, bool, bool], Any] = {}
"""The PostgreSQL reservation statements, one per combination of limits, built once with every value a bound
parameter: building the statement and its cache key anew on each request cost more than running it."""


def _pg_reservation(limit_tokens: bool, limit_requests: bool, *, marked: bool) -> Any:
    """The one-statement reservation on PostgreSQL: the conditional upsert and, when it changed the row, the
    ``applied_writes`` marker (a marker already there, an undo that came first, fails the whole statement so the
    reservation never lands); it selects how many rows the upsert changed (0 or 1)."""
    key = (limit_tokens, limit_requests, marked)
    if (found := _PG_RESERVATIONS.get(key)) is not None:
        return found
    tokens = bindparam("tokens", type_=BigInteger())
    requests = bindparam("requests", type_=BigInteger())
    conditions = []
    if limit_tokens:
        conditions.append(UsageMonthly.tokens + tokens <= bindparam("max_tokens", type_=BigInteger()))
    if limit_requests:
        conditions.append(UsageMonthly.requests + requests <= bindparam("max_requests", type_=BigInteger()))
    upsert = (
        postgresql.insert(UsageMonthly)
        .values(key_id=bindparam("key_id"), month=bindparam("month"), tokens=tokens, requests=requests)
        .on_conflict_do_update(
            index_elements=["key_id", "month"],
            set_={"tokens": UsageMonthly.tokens + tokens, "requests": UsageMonthly.requests + requests},
            where=and_(*conditions) if conditions else None,
        )
    )
    reserved = upsert.returning(UsageMonthly.key_id).cte("reserved")
    counted: Any = select(func.count()).select_from(reserved)
    if marked:
        marker = select(
            bindparam("write_id", type_=AppliedWrite.id.type), bindparam("now", type_=AppliedWrite.created_at.type)
        )
        marks = insert(AppliedWrite).from_select(["id", "created_at"], marker.select_from(reserved)).cte("marked")
        counted = counted.add_cte(marks)
    _PG_RESERVATIONS[key] = counted
    return counted


async def undo_reservation(
    session: AsyncSession, write_id: str, key_id: str, month: str, tokens: int, requests: int = 1
) -> bool:
    """Give back a reservation made with ``write_id`` if, and only if, it was applied; the caller commits.

    For a reservation whose caller never learnt the outcome (it timed out, the connection dropped, the request was
    cancelled). Its marker is claimed with ``INSERT ... ON CONFLICT DO NOTHING``: on PostgreSQL that waits for a
    reservation still in flight to commit or roll back. A conflict means the reservation was applied: its ``requests``
    and ``tokens`` are given back. Otherwise the inserted marker blocks the reservation for good (a late arrival
    fails on it). Run it inside an idempotent batch (:func:`mark_applied`), so a retried undo gives back once.

    Returns:
        Whether the reservation had been applied (and was given back now).
    """
    if await _claim(session, write_id):
        return False
    await add_usage(session, key_id, month, -tokens, -requests)
    return True


async def mark_applied(session: AsyncSession, write_id: str) -> bool:
    """Record that the transaction on ``session`` applies the write ``write_id``; the caller commits.

    Call it first in the write's transaction: ``False`` means a committed transaction already applied this id (a
    retry after a lost answer), and the caller should apply nothing. On PostgreSQL an attempt still in flight
    holds the id, so a retry waits for it to commit (``False``) or roll back (``True``).
    """
    return await _claim(session, write_id)


async def _claim(session: AsyncSession, write_id: str) -> bool:
    """Insert ``write_id`` unless it is there; whether it was inserted.

    By the row count, not ``RETURNING``: on SQLite a statement with ``RETURNING`` whose caller is cancelled before
    it read the rows stays in progress, and its connection keeps the write lock after the rollback (measured with
    aiosqlite: the database stayed locked until the connection closed).
    """
    stmt = (
        dialect_insert(session, AppliedWrite)
        .values(id=write_id, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["id"])
    )
    return rowcount(await session.execute(stmt)) == 1


async def delete_applied_writes_before(session: AsyncSession, cutoff: datetime, chunk_size: int = 1000) -> int:
    """Forget write ids recorded before ``cutoff`` (in committed chunks); returns how many.

    Keep them for longer than any retry can come: a day is ample (a lost write is retried or undone within the
    database's next answer).
    """
    old = AppliedWrite.created_at < cutoff
    return await delete_in_chunks(session, AppliedWrite, AppliedWrite.id, old, chunk_size)


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
