"""Small dialect-aware helpers shared by the store modules."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from sqlalchemy import ColumnElement, Result, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

T = TypeVar("T")

# A SQLite writer that still finds the file locked after its busy timeout retries this many times.
_LOCKED_RETRIES = 5


def dialect_name(session: AsyncSession) -> str:
    """``sqlite``, ``postgresql``, ... of the session's bind."""
    return session.get_bind().dialect.name


def dialect_insert(session: AsyncSession, model: Any) -> Any:
    """An ``INSERT`` construct with ``on_conflict_do_nothing``/``on_conflict_do_update`` for the session's dialect.

    Raises:
        NotImplementedError: the database is neither SQLite nor PostgreSQL.
    """
    name = dialect_name(session)
    if name == "sqlite":
        return sqlite.insert(model)
    if name == "postgresql":
        return postgresql.insert(model)
    raise NotImplementedError(f"upserts are implemented for sqlite and postgresql, not {name}")


def rowcount(result: Result[Any]) -> int:
    """Rows matched by an ``UPDATE``/``DELETE`` executed through a session."""
    return int(cast("CursorResult[Any]", result).rowcount)


async def delete_in_chunks(
    session: AsyncSession, model: Any, key: Any, condition: ColumnElement[bool], chunk_size: int
) -> int:
    """Delete ``model`` rows matching ``condition``, ``chunk_size`` rows per committed transaction.

    Small chunks keep each write lock short, so request handlers that write concurrently are never stalled for
    long. Anything pending on ``session`` is committed with the first chunk.

    Args:
        key: The primary-key column the chunks are selected by (ordered, so each chunk takes the oldest ids).

    Returns:
        How many rows were deleted.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk = select(key).where(condition).order_by(key).limit(chunk_size)
    stmt = delete(model).where(key.in_(chunk)).execution_options(synchronize_session=False)
    total = 0
    while True:
        deleted = rowcount(await session.execute(stmt))
        await session.commit()
        total += deleted
        if deleted < chunk_size:
            return total


def _is_locked(exc: OperationalError) -> bool:
    message = str(exc.orig).lower()
    return "database is locked" in message or "database table is locked" in message


async def own_transaction(session: AsyncSession, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work`` as its own short transaction on ``session`` and commit it.

    Whatever the session already holds is committed first, so a retry (SQLite still locked after its busy
    timeout) rolls back only ``work``'s statements.
    """
    if session.in_transaction():
        await session.commit()
    for attempt in range(_LOCKED_RETRIES + 1):
        try:
            value = await work()
            await session.commit()
            return value
        except OperationalError as exc:
            await session.rollback()
            if attempt == _LOCKED_RETRIES or not _is_locked(exc):
                raise
            await asyncio.sleep(0.05 * 2**attempt)
        except Exception:
            await session.rollback()
            raise
    raise AssertionError("unreachable")  # pragma: no cover
