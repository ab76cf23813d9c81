"""Stored ``/v1/responses`` objects, as the API layer uses them: one bounded database call per method.

Each method is one statement (``Database.run(..., single_statement=True)``: autocommit on PostgreSQL); writes queue
behind this process's other writes on SQLite. Every read, delete and cancellation is scoped by the key id, so a
response of another key looks exactly like a missing one. The bytes are the JSON the server encoded; they pass
through unread.

Errors: :class:`~server.records.database.DatabaseUnavailable` when the database cannot answer now (after a write,
its outcome is unknown), ``ValueError`` from :meth:`ResponseStore.create` for an id that is taken.
"""

from __future__ import annotations

from persistence import store
from persistence.records import ResponseRecord
from server.records.database import Database

__all__ = ("ResponseRecord", "ResponseStore")


class ResponseStore:
    """The stored responses of the app's database.

    Args:
        db: The app's database handle.
    """

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self,
        *,
        id: str,
        key_id: str,
        model: str,
        status: str,
        background: bool,
        previous_response_id: str | None,
        response: bytes,
        input_items: bytes,
    ) -> None:
        """Store a new response, created now.

        Raises:
            ValueError: ``id`` is taken.
        """
        await self._db.run(
            lambda s: store.insert_response(
                s,
                id=id,
                key_id=key_id,
                model=model,
                status=status,
                background=background,
                previous_response_id=previous_response_id,
                response=response,
                input_items=input_items,
            ),
            write=True,
            single_statement=True,
        )

    async def get(self, id: str, key_id: str) -> ResponseRecord | None:
        """The response ``id`` of ``key_id``, or ``None``."""
        return await self._db.run(lambda s: store.get_response(s, id, key_id), single_statement=True)

    async def update(self, id: str, *, status: str, response: bytes) -> bool:
        """Store the new status and Response object of ``id``; ``False`` if it was deleted meanwhile."""
        return await self._db.run(
            lambda s: store.update_response(s, id, status=status, response=response),
            write=True,
            single_statement=True,
        )

    async def delete(self, id: str, key_id: str) -> bool:
        """Delete the response ``id`` of ``key_id``; ``False`` if there is none."""
        return await self._db.run(lambda s: store.delete_response(s, id, key_id), write=True, single_statement=True)

    async def request_cancel(self, id: str, key_id: str) -> ResponseRecord | None:
        """Ask for the response ``id`` of ``key_id`` to be cancelled; the row as it is now, or ``None``."""
        return await self._db.run(lambda s: store.request_cancel(s, id, key_id), write=True, single_statement=True)

    async def cancel_requested(self, id: str) -> bool | None:
        """Whether cancelling ``id`` was asked for (``None`` once it is gone)."""
        return await self._db.run(lambda s: store.is_cancel_requested(s, id), single_statement=True)
