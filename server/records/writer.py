"""The request log and usage accounting, written in batches off the hot path.

Handlers fill a :class:`RequestRecord` per ``/v1`` request; when the response (or the stream) ends it is queued.
One background task writes what was queued every ``interval_s``: usage increments (summed per key and month),
undos of reservations whose outcome was lost, log rows, and completion-cache entries.

Exactly once. Each flush forms *units*: one of usage, log rows in chunks of at most ``CHUNK_ROWS``, one of
undos. A unit gets an id when it is formed and records it in ``applied_writes`` first in its own transaction; a
unit whose write failed as "unavailable" (which may still have committed: a timeout, a lost connection) is
retried later as the same unit with the same id, before anything newer, and skipped if its id is already there.
Usage is a unit of its own, so a log row the database rejects can never take usage with it.

Nothing lost. While the database is unavailable (down, restarting, locked, not answering) the units are held and
retried with a backoff (``interval_s`` doubling up to ``MAX_BACKOFF_S``), so what was held is written within
about ``MAX_BACKOFF_S`` of the database's return. Usage and undos are always held (they are owed); log rows up to
``max_rows``, beyond which new rows are dropped and counted in ``dropped``; cache entries up to
``MAX_CACHE_BYTES``. Rows are cleaned before they are inserted (``persistence.logs.clean_request_log_row``:
NUL and lone surrogates, over-long strings, out-of-range numbers); a unit the database still *rejects* (an
integrity or data error) is split and its items retried one at a time, and only the items rejected alone are
dropped (rows counted in ``dropped``, usage logged with its amounts). On shutdown one last flush runs; if the
database is unavailable then, what is still queued is lost and logged.

The retention pass (:class:`server.records.units.Retention`), after a successful flush: expired completion-cache entries
every ``CACHE_PURGE_INTERVAL_S``; hourly, request-log rows and stored responses older than their retention and
``applied_writes`` ids older than ``APPLIED_WRITES_KEEP``.

Log lines never carry SQL parameters, prompt or output text: database errors are named by
:func:`server.records.database.describe_error` (classes and SQLSTATE) and counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from server.records.database import Database, DatabaseUnavailable, describe_error, error_location
from server.records.record import RequestRecord
from server.records.units import CacheQueue, Retention, Unit, apply_unit, new_write_id, put_cache

log = logging.getLogger("server.records.writer")
T = TypeVar("T")

CHUNK_ROWS = 1000
"""Most log rows written per transaction (a large backlog after an outage is written in several)."""
MAX_BACKOFF_S = 2.0
"""Longest pause between flush attempts while the database is unavailable."""


class BatchWriter:
    """Batches request-log rows, usage increments, undos and cache entries into idempotent periodic writes.

    Args:
        db: Where to write.
        interval_s: Flush period.
        max_rows: Bound of the rows held; beyond it new rows are dropped and counted in ``dropped``.
        retention_days: Rows older than this are deleted (in chunks) once an hour; 0 keeps them.
        responses_retention_days: Stored responses older than this are deleted (in chunks) once an hour; 0 keeps
            them.
    """

    def __init__(
        self,
        db: Database,
        *,
        interval_s: float = 0.5,
        max_rows: int = 10_000,
        retention_days: int = 0,
        responses_retention_days: int = 0,
    ):
        self._db = db
        self._interval = interval_s
        self._max_rows = max_rows
        self._rows: list[dict[str, Any]] = []
        self._usage: defaultdict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self._undos: list[tuple[str, str, str, int, int]] = []
        self._units: list[Unit] = []  # formed, not written yet: retried first, as they are
        self._unit_rows = 0  # log rows inside self._units
        self._cache = CacheQueue()
        self._retention = Retention(db, retention_days, responses_retention_days)
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.dropped = 0
        self.before_flush: Callable[[bool], None] | None = None
        """Called before each flush forms its units: ``(everything)``, true for the last flush at shutdown and for
        ``flush(everything=True)``. What it queues (``server.admission.leases`` gives back its idle quota leases, or
        all of them) is written by that flush."""
        self._down_since: float | None = None  # monotonic time of the first failed flush of an outage

    @property
    def pending_rows(self) -> int:
        """Log rows not written yet: queued, or in a unit that has not committed."""
        return len(self._rows) + self._unit_rows

    # -- producers (event loop, never block) -----------------------------------------------------------
    def add_row(self, record: RequestRecord) -> None:
        if record.done:
            return
        record.done = True
        if self.pending_rows >= self._max_rows:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("request log queue full: dropped %d rows so far", self.dropped)
            return
        self._rows.append(record.row())

    def add_usage(self, key_id: str, month: str, tokens: int, requests: int) -> None:
        entry = self._usage[(key_id, month)]
        entry[0] += tokens
        entry[1] += requests

    def add_undo(self, write_id: str, key_id: str, month: str, tokens: int, requests: int = 1) -> None:
        """Give back the reservation ``write_id`` (``requests`` and ``tokens``) if it was applied; its caller never
        learnt whether it was (see ``persistence.usage.undo_reservation``)."""
        self._undos.append((write_id, key_id, month, tokens, requests))

    def queued_usage(self, key_id: str, month: str) -> tuple[int, int]:
        """Usage of ``(key_id, month)`` queued here and not yet formed into a unit (tokens, requests)."""
        entry = self._usage.get((key_id, month))
        return (entry[0], entry[1]) if entry is not None else (0, 0)

    def add_cache(self, cache_key: str, key_id: str, model: str, response: bytes, ttl_s: float) -> None:
        """Queue a completion-cache entry; :meth:`cached` serves it at once, before it is written."""
        self._cache.add(cache_key, key_id, model, response, ttl_s)

    def cached(self, cache_key: str) -> bytes | None:
        """A cache entry queued here and not written yet (``None`` if there is none or it expired)."""
        return self._cache.get(cache_key)

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="request-log-writer")

    async def stop(self) -> None:
        """Stop the loop and flush what is queued (what the database cannot take now is logged as lost)."""
        if self._task is not None:
            async with self._lock:  # a flush in progress finishes first: cancelled mid-write, its rows were lost
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if not await self.flush(everything=True):
            usage = {(k, m) for u in self._units if u.kind == "usage" for k, m, _, _ in u.items} | set(self._usage)
            undos = sum(len(u.items) for u in self._units if u.kind == "undo") + len(self._undos)
            log.error(
                "shutting down while the database is unavailable: %d request-log rows, the usage of %d key-months "
                "and %d reservation undos were not written",
                self.pending_rows,
                len(usage),
                undos,
            )

    async def _loop(self) -> None:
        delay = self._interval
        while True:
            await asyncio.sleep(delay)
            try:
                ok = await self.flush()
                if ok:
                    await self.retention()
            except Exception as exc:  # keep the writer alive whatever one pass hit
                log.error("request log writer pass failed: %s%s", describe_error(exc), error_location(exc))
                ok = False
            delay = self._interval if ok else min(delay * 2, MAX_BACKOFF_S)

    async def flush(self, *, everything: bool = False) -> bool:
        """Write everything queued now (tests call this to observe the database).

        Args:
            everything: ``before_flush`` gives back all it holds, not only what is idle (a read of usage that
                wants this replica's figures exact: its quota leases are not counted as used).

        Returns:
            False when the database was unavailable: what was not written is held (see the module docstring).
        """
        async with self._lock:
            if everything and self.before_flush is not None:
                self.before_flush(True)
            return await self._flush()

    async def read_flushed(
        self, fn: Callable[[AsyncSession], Awaitable[T]], key_id: str, month: str
    ) -> tuple[T, int, int]:
        """Flush, then run the read ``fn`` before anything else is written.

        Returns:
            ``fn``'s result and the usage of ``(key_id, month)`` queued since the flush (tokens, requests): the
            database holds everything queued before, nothing queued after.

        Raises:
            DatabaseUnavailable: the flush or the read failed.
        """
        async with self._lock:
            if not await self._flush():
                raise DatabaseUnavailable("the request log writer could not flush")
            result = await self._db.run(fn)
            return (result, *self.queued_usage(key_id, month))

    async def _flush(self) -> bool:
        if self.before_flush is not None:
            self.before_flush(False)
        if self._units and not await self._write_units():  # held from an earlier attempt: same units, same ids
            return False
        self._form_units()
        if not await self._write_units() or not await self._write_cache():
            return False
        if self._down_since is not None:
            log.warning(
                "request log: the database is back after %.1fs; wrote everything held (%d rows dropped so far)",
                time.monotonic() - self._down_since,
                self.dropped,
            )
            self._down_since = None
        return True

    def _form_units(self) -> None:
        usage = [(k, m, t, r) for (k, m), (t, r) in self._usage.items() if t or r]
        self._usage = defaultdict(lambda: [0, 0])
        if usage:
            self._units.append(Unit(new_write_id("w"), "usage", usage))
        rows, self._rows = self._rows, []
        for i in range(0, len(rows), CHUNK_ROWS):
            self._units.append(Unit(new_write_id("w"), "rows", rows[i : i + CHUNK_ROWS]))
        self._unit_rows += len(rows)
        if self._undos:
            self._units.append(Unit(new_write_id("w"), "undo", self._undos))
            self._undos = []

    async def _write_units(self) -> bool:
        """Write the formed units in order; stop at the first the database cannot take now (held for later)."""
        rejected: dict[str, int] = {}
        try:
            while self._units:
                unit = self._units[0]
                try:
                    applied = await self._db.run(partial(apply_unit, unit=unit), write=True)
                except DatabaseUnavailable as exc:
                    self._note_down(exc)
                    return False
                except Exception as exc:  # rejected: retrying it whole would fail again and block what follows
                    del self._units[0]
                    if len(unit.items) > 1:
                        self._units[0:0] = unit.split()
                    else:
                        self._drop(unit, exc, rejected)
                    continue
                del self._units[0]
                if unit.kind == "rows":
                    self._unit_rows -= len(unit.items)
                if not applied:
                    log.info("request log: a %s write retried after a lost answer had already committed", unit.kind)
            return True
        finally:
            for reason, count in rejected.items():
                log.error("the database rejected %d request-log rows, dropped (retried alone first; %s)", count, reason)

    def _drop(self, unit: Unit, exc: Exception, rejected: dict[str, int]) -> None:
        """A unit of one item the database rejected: drop it, say so without its values (rows: one line for all)."""
        reason = describe_error(exc) + error_location(exc)
        if unit.kind == "rows":
            self._unit_rows -= 1
            self.dropped += 1
            rejected[reason] = rejected.get(reason, 0) + 1
        else:
            log.error("%s", unit.dropped(reason))

    async def _write_cache(self) -> bool:
        batch = self._cache.due()
        if batch:
            try:
                await self._db.run(lambda s: put_cache(s, batch), write=True)
            except DatabaseUnavailable as exc:
                self._note_down(exc)
                return False
            except Exception as exc:  # an optimisation: not worth a retry one by one
                log.error("the database rejected %d cache entries, dropped (%s)", len(batch), describe_error(exc))
            self._cache.written(batch)
        return True

    def _note_down(self, exc: DatabaseUnavailable) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "request log: the database is unavailable (%s); holding %d rows (at most %d), all usage and undos; "
                "retrying every %.1fs at most",
                describe_error(exc),
                self.pending_rows,
                self._max_rows,
                MAX_BACKOFF_S,
            )

    # -- retention -------------------------------------------------------------------------------------
    async def retention(self) -> None:
        """Run the retention steps that are due (the loop calls this after each successful flush)."""
        await self._retention.run()
