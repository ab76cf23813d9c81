"""Stored ``/v1/responses`` objects. The caller owns the transaction, except in :func:`delete_responses_before`.

Every read, delete and cancellation takes the id of the API key that created the response and matches on it too:
a response of another key is indistinguishable from a missing one. Each function is one statement, so a caller may
run it in autocommit mode. The stored bytes are opaque here: the server encodes and decodes them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from persistence._sql import delete_in_chunks, rowcount
from persistence.models import StoredResponse, utcnow
from persistence.records import ResponseRecord

__all__ = (
    "delete_response",
    "delete_responses_before",
    "get_response",
    "insert_response",
    "is_cancel_requested",
    "request_cancel",
    "update_response",
)


async def insert_response(
    session: AsyncSession,
    *,
    id: str,
    key_id: str,
    model: str,
    status: str,
    background: bool,
    previous_response_id: str | None,
    response: bytes,
    input_items: bytes,
    created_at: datetime | None = None,
) -> None:
    """Store a new response (``created_at`` and ``updated_at`` now unless ``created_at`` is given).

    Raises:
        ValueError: a response with this id exists already (the session must then be rolled back).
    """
    at = created_at if created_at is not None else utcnow()
    stmt = insert(StoredResponse).values(
        id=id,
        key_id=key_id,
        model=model,
        status=status,
        background=background,
        previous_response_id=previous_response_id,
        response=response,
        input_items=input_items,
        cancel_requested=False,
        created_at=at,
        updated_at=at,
    )
    try:
        await session.execute(stmt)
    except IntegrityError as exc:
        raise ValueError(f"a response with id {id!r} already exists") from exc


async def get_response(session: AsyncSession, id: str, key_id: str) -> ResponseRecord | None:
    """The response ``id`` if ``key_id`` created it, else ``None``."""
    query = select(StoredResponse).where(StoredResponse.id == id, StoredResponse.key_id == key_id)
    row = await session.scalar(query)
    return None if row is None else ResponseRecord.from_orm(row)


async def update_response(session: AsyncSession, id: str, *, status: str, response: bytes) -> bool:
    """Replace the status and the Response object of ``id``; ``False`` if the row is gone (deleted meanwhile).

    Not scoped by key: the server updates only responses it created in this request or its background task.
    """
    stmt = (
        update(StoredResponse)
        .where(StoredResponse.id == id)
        .values(status=status, response=response, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return rowcount(await session.execute(stmt)) == 1


async def delete_response(session: AsyncSession, id: str, key_id: str) -> bool:
    """Delete the response ``id`` of ``key_id``; ``False`` if there is none."""
    stmt = (
        delete(StoredResponse)
        .where(StoredResponse.id == id, StoredResponse.key_id == key_id)
        .execution_options(synchronize_session=False)
    )
    return rowcount(await session.execute(stmt)) == 1


async def request_cancel(session: AsyncSession, id: str, key_id: str) -> ResponseRecord | None:
    """Mark the response ``id`` of ``key_id`` as to be cancelled and return it as it is now; ``None`` if there is none.

    Only the flag is set: the task generating the response reads it (:func:`is_cancel_requested`), stops, and
    stores the final status itself. One ``UPDATE ... RETURNING``, so the record is the row this update left.
    """
    stmt = (
        update(StoredResponse)
        .where(StoredResponse.id == id, StoredResponse.key_id == key_id)
        .values(cancel_requested=True)
        .returning(StoredResponse)
        .execution_options(synchronize_session=False)
    )
    row = (await session.execute(stmt)).scalar_one_or_none()
    return None if row is None else ResponseRecord.from_orm(row)


async def is_cancel_requested(session: AsyncSession, id: str) -> bool | None:
    """Whether cancelling ``id`` was asked for; ``None`` when it does not exist (deleted, or not written yet)."""
    query = select(StoredResponse.cancel_requested).where(StoredResponse.id == id)
    flag = await session.scalar(query)
    return None if flag is None else bool(flag)


async def delete_responses_before(session: AsyncSession, cutoff: datetime, chunk_size: int = 1000) -> int:
    """Delete responses created before ``cutoff``, ``chunk_size`` rows per committed transaction.

    Small chunks keep each write lock short, so requests that store responses concurrently are never stalled for
    long. Anything pending on ``session`` is committed with the first chunk.

    Returns:
        How many responses were deleted.
    """
    old = StoredResponse.created_at < cutoff
    return await delete_in_chunks(session, StoredResponse, StoredResponse.id, old, chunk_size)
