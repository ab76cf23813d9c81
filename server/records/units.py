"""What the request-log writer writes and how: idempotent units, queued cache entries, the retention pass.

A :class:`Unit` is one transaction of the writer. Its id is fixed when it is formed and recorded in
``applied_writes`` first in its transaction, so a unit whose answer was lost (it may have committed) is retried as
it is and applied once. Log lines here never carry a unit's values beyond key ids and amounts.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from persistence import store
from server.records.database import Database, DatabaseUnavailable, describe_error

log = logging.getLogger("server.records.writer")

RETENTION_TIMEOUT_S = 60.0
"""Longest one retention step may take (it deletes in small committed chunks)."""
RETENTION_INTERVAL_S = 3600.0
"""How often old request-log rows, old stored responses and old ``applied_writes`` ids are deleted."""
CACHE_PURGE_INTERVAL_S = 30.0
"""How often expired completion-cache entries are deleted (an entry outlives its TTL by at most about this)."""
APPLIED_WRITES_KEEP = timedelta(days=1)
"""How long a unit's or a reservation's id is kept: far longer than any retry or undo of it can come."""
MAX_CACHE_BYTES = 32 * 1024 * 1024
"""Most bytes of completion-cache entries held in memory until they are written (beyond it they are skipped)."""


def new_write_id(prefix: str) -> str:
    """A fresh id for ``applied_writes`` (``prefix`` names the kind of write; 34 characters in all)."""
    return f"{prefix}:{uuid.uuid4().hex}"


@dataclass(slots=True)
class Unit:
    """One idempotent write of the writer.

    Attributes:
        id: Recorded in ``applied_writes`` by the unit's transaction.
        kind: ``usage`` (items: key id, month, tokens, requests), ``rows`` (request-log row dicts) or ``undo``
            (items: reservation write id, key id, month, tokens, requests).
        items: What it writes.
    """

    id: str
    kind: str
    items: list[Any]

    def split(self) -> list[Unit]:
        """One unit per item, with ids derived from this one (for a unit the database rejected: it never
        committed, so its items may be written under new ids)."""
        return [Unit(f"{self.id}.{i}", self.kind, [item]) for i, item in enumerate(self.items)]

    def dropped(self, reason: str) -> str:
        """The log line for a one-item unit the database rejected: amounts and ids, never text."""
        if self.kind == "usage":
            key_id, month, tokens, requests = self.items[0]
            return (
                f"the database rejected a usage increment, dropped: key {key_id} month {month} tokens {tokens} "
                f"requests {requests} ({reason})"
            )
        if self.kind == "undo":
            write_id, key_id, month, tokens, requests = self.items[0]
            return (
                f"the database rejected the undo of reservation {write_id} (key {key_id} month {month} tokens "
                f"{tokens} requests {requests}), dropped ({reason})"
            )
        return f"the database rejected a request-log row, dropped ({reason})"


async def apply_unit(session: AsyncSession, unit: Unit) -> bool:
    """One unit's transaction (the caller commits); ``False`` if an earlier attempt already committed it."""
    if not await store.mark_applied(session, unit.id):
        return False
    if unit.kind == "usage":
        for key_id, month, tokens, requests in unit.items:
            await store.add_usage(session, key_id, month, tokens, requests)
    elif unit.kind == "rows":
        await store.insert_request_logs(session, unit.items)
    else:
        for write_id, key_id, month, tokens, requests in unit.items:
            await store.undo_reservation(session, write_id, key_id, month, tokens, requests)
    return True


@dataclass(slots=True)
class CacheEntry:
    key_id: str
    model: str
    response: bytes
    expires_at: datetime


class CacheQueue:
    """Completion-cache entries not written yet, served from memory meanwhile (bounded by ``MAX_CACHE_BYTES``)."""

    def __init__(self) -> None:
        self._entries: dict[str, CacheEntry] = {}
        self._bytes = 0

    def add(self, cache_key: str, key_id: str, model: str, response: bytes, ttl_s: float) -> None:
        old = self._entries.pop(cache_key, None)
        if old is not None:
            self._bytes -= len(old.response)
        if self._bytes + len(response) > MAX_CACHE_BYTES:
            return  # an optimisation only: skipped while the database does not take what is held
        self._entries[cache_key] = CacheEntry(key_id, model, response, datetime.now(UTC) + timedelta(seconds=ttl_s))
        self._bytes += len(response)

    def get(self, cache_key: str) -> bytes | None:
        entry = self._entries.get(cache_key)
        if entry is None or entry.expires_at <= datetime.now(UTC):
            return None
        return entry.response

    def due(self) -> list[tuple[str, CacheEntry]]:
        """The entries to write now (expired ones are forgotten)."""
        now = datetime.now(UTC)
        for key in [k for k, e in self._entries.items() if e.expires_at <= now]:
            self._bytes -= len(self._entries.pop(key).response)
        return list(self._entries.items())

    def written(self, batch: list[tuple[str, CacheEntry]]) -> None:
        """Forget ``batch`` (written, or dropped), except entries replaced meanwhile."""
        for key, entry in batch:
            if self._entries.get(key) is entry:
                del self._entries[key]
                self._bytes -= len(entry.response)


async def put_cache(session: AsyncSession, batch: list[tuple[str, CacheEntry]]) -> None:
    for cache_key, e in batch:
        await store.cache_put(session, cache_key, e.key_id, e.model, e.response, e.expires_at)


class Retention:
    """The writer's retention pass: expired cache entries every ``CACHE_PURGE_INTERVAL_S``; hourly, old write ids,
    (``retention_days`` > 0) request-log rows older than that and (``responses_retention_days`` > 0) stored
    responses older than that."""

    def __init__(self, db: Database, retention_days: int, responses_retention_days: int = 0) -> None:
        self._db = db
        self._days = retention_days
        self._responses_days = responses_retention_days
        self._last_purge = -CACHE_PURGE_INTERVAL_S
        self._last_hourly = -RETENTION_INTERVAL_S

    async def run(self) -> None:
        """Run the steps that are due; a database unavailable ends the pass (retried at the next one)."""
        now = time.monotonic()
        if now - self._last_purge >= CACHE_PURGE_INTERVAL_S:
            self._last_purge = now
            purged = await self._delete("expired cache entries", lambda s: store.cache_purge_expired(s, _utc()))
            if purged is None:
                return  # the next steps would wait for it too, while the writer has rows to write
            if purged:
                log.debug("completion cache: purged %d expired entries", purged)
        if now - self._last_hourly < RETENTION_INTERVAL_S:
            return
        self._last_hourly = now
        ids_cutoff = _utc() - APPLIED_WRITES_KEEP
        deleted = await self._delete("old write ids", lambda s: store.delete_applied_writes_before(s, ids_cutoff))
        if deleted is not None and self._days:
            cutoff = _utc() - timedelta(days=self._days)
            deleted = await self._delete("old request-log rows", lambda s: store.delete_request_logs_before(s, cutoff))
            if deleted:
                log.info("request log retention deleted %d rows older than %s", deleted, cutoff.date())
        if deleted is not None and self._responses_days:
            responses_cutoff = _utc() - timedelta(days=self._responses_days)
            deleted = await self._delete(
                "old stored responses", lambda s: store.delete_responses_before(s, responses_cutoff)
            )
            if deleted:
                log.info(
                    "responses retention deleted %d stored responses older than %s", deleted, responses_cutoff.date()
                )
        if deleted is None:
            self._last_hourly -= RETENTION_INTERVAL_S - 60  # retry in a minute

    async def _delete(self, what: str, fn: Callable[[AsyncSession], Awaitable[int]]) -> int | None:
        """One chunked delete, bounded like every other database call; ``None`` if the database was unavailable."""
        try:
            return await self._db.run(fn, timeout_s=max(RETENTION_TIMEOUT_S, self._db.timeout_s))
        except DatabaseUnavailable as exc:
            log.warning("request log retention: deleting %s skipped for now (%s)", what, describe_error(exc))
            return None


def _utc() -> datetime:
    return datetime.now(UTC)
