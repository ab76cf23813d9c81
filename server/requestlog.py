"""The request log and usage accounting, written in batches off the hot path.

Handlers fill a :class:`RequestRecord` per ``/v1`` request; when the response (or the stream) ends it is queued.
One background task flushes queued rows, usage increments (summed per key and month) and cache entries every
``interval_s``, in transactions of at most ``CHUNK_ROWS`` rows, each bounded by the database timeout.

When the database is unavailable (down, restarting, locked, not answering) nothing is lost within these bounds:
the batch goes back to the queue and the writer retries with a backoff (``interval_s`` doubling up to
``MAX_BACKOFF_S``), so what was held is written within about ``MAX_BACKOFF_S`` of the database's return. Usage
increments are sums per (key, month), so they are always kept; log rows are kept up to ``max_rows`` and, beyond
it, the newest are dropped and counted in ``dropped``; cache entries (an optimisation) are dropped. A batch the
database *rejects* (an integrity or data error, i.e. a bug) is logged with its usage amounts and dropped, so it
cannot block the batches behind it. On shutdown one last flush runs; if the database is unavailable then, what is
still queued is lost and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from persistence import store
from server.database import Database, DatabaseUnavailable

log = logging.getLogger("server.requestlog")

CHUNK_ROWS = 1000
"""Most log rows written per transaction (a large backlog after an outage is written in several)."""
MAX_BACKOFF_S = 2.0
"""Longest pause between flush attempts while the database is unavailable."""
RETENTION_TIMEOUT_S = 60.0
"""Longest an hourly retention pass may take (it deletes in small committed chunks)."""


@dataclass(slots=True)
class RequestRecord:
    """What one ``/v1`` request did; ``done`` once it has been queued."""

    request_id: str
    route: str
    method: str
    started: float = field(default_factory=time.perf_counter)
    key_id: str | None = None
    model: str | None = None
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    finish_reason: str | None = None
    cached: bool = False
    usage_estimated: bool = False
    error_type: str | None = None
    prompt_text: str | None = None
    output_text: str | None = None
    streaming: bool = False
    done: bool = False

    def end(
        self,
        *,
        completion_tokens: int,
        cached: bool,
        finish_reasons: Iterable[str | None],
        ok: bool,
        output_text: str | None,
    ) -> None:
        """Note how a generation request ended (``ok``: every choice finished; else ``cancelled`` unless an error
        was noted); several different finish reasons are logged as ``mixed``."""
        self.completion_tokens = completion_tokens
        self.cached = cached
        finishes = {f for f in finish_reasons if f}
        self.finish_reason = finishes.pop() if len(finishes) == 1 else ("mixed" if finishes else None)
        if not ok and self.error_type is None:
            self.error_type = "cancelled"
        if output_text is not None:
            self.output_text = output_text
        if self.streaming:
            self.status = self.status or 200

    def first_token(self) -> None:
        """Note the time to the first token (once)."""
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.started) * 1000

    def row(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "key_id": self.key_id,
            "model": self.model,
            "route": self.route,
            "method": self.method,
            "status": self.status,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms": (time.perf_counter() - self.started) * 1000,
            "ttft_ms": self.ttft_ms,
            "finish_reason": self.finish_reason,
            "cached": self.cached,
            "usage_estimated": self.usage_estimated,
            "error_type": self.error_type,
            "prompt_text": self.prompt_text,
            "output_text": self.output_text,
            "created_at": datetime.now(UTC),
        }


class RequestLogWriter:
    """Batches request-log rows, usage increments and cache entries into periodic transactions.

    Args:
        db: Where to write.
        interval_s: Flush period.
        max_rows: Bound of the row queue; beyond it rows are dropped and counted in ``dropped``.
        retention_days: Rows older than this are deleted (in chunks) once an hour; 0 keeps them.
    """

    def __init__(self, db: Database, *, interval_s: float = 0.5, max_rows: int = 10_000, retention_days: int = 0):
        self._db = db
        self._interval = interval_s
        self._max_rows = max_rows
        self._retention_days = retention_days
        self._rows: list[dict[str, Any]] = []
        self._usage: defaultdict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        self._cache: list[tuple[str, str, str, bytes, datetime]] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.dropped = 0
        self._last_retention = 0.0
        self._down_since: float | None = None  # monotonic time of the first failed flush of an outage
        self._flushing = 0  # rows taken by the flush in progress

    @property
    def pending_rows(self) -> int:
        """Log rows not written yet: queued, or in a flush that has not committed."""
        return len(self._rows) + self._flushing

    # -- producers (event loop, never block) -----------------------------------------------------------
    def add_row(self, record: RequestRecord) -> None:
        if record.done:
            return
        record.done = True
        if len(self._rows) >= self._max_rows:
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("request log queue full: dropped %d rows so far", self.dropped)
            return
        self._rows.append(record.row())

    def add_usage(self, key_id: str, month: str, tokens: int, requests: int) -> None:
        entry = self._usage[(key_id, month)]
        entry[0] += tokens
        entry[1] += requests

    def add_cache(self, cache_key: str, key_id: str, model: str, response: bytes, ttl_s: float) -> None:
        self._cache.append((cache_key, key_id, model, response, datetime.now(UTC) + timedelta(seconds=ttl_s)))

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
        if not await self.flush():
            log.error(
                "shutting down while the database is unavailable: %d request-log rows and the usage of %d "
                "key-months were not written",
                len(self._rows),
                len(self._usage),
            )

    async def _loop(self) -> None:
        delay = self._interval
        while True:
            await asyncio.sleep(delay)
            try:
                ok = await self.flush()
                if ok:
                    await self._retention()
            except Exception:  # keep the writer alive whatever one pass hit
                log.exception("request log writer pass failed")
                ok = False
            delay = self._interval if ok else min(delay * 2, MAX_BACKOFF_S)

    async def flush(self) -> bool:
        """Write everything queued now (tests call this to observe the database).

        Returns:
            False when the database was unavailable: what was not written is queued again (see the module
            docstring for the bounds).
        """
        async with self._lock:
            rows, self._rows = self._rows, []
            usage, self._usage = self._usage, defaultdict(lambda: [0, 0])
            cache, self._cache = self._cache, []
            if not (rows or usage or cache):
                return True
            total, first = len(rows), True
            while first or rows:
                chunk = rows[:CHUNK_ROWS]
                self._flushing = len(rows)
                try:
                    await self._db.run(_writer(usage, chunk, cache) if first else _writer({}, chunk, []), write=True)
                except DatabaseUnavailable as exc:
                    self._requeue(usage if first else {}, rows, exc)
                    return False
                except Exception:
                    # Rejected, not unavailable: retrying would fail again and block every batch behind it.
                    lost = {k: tuple(v) for k, v in usage.items()} if first else {}
                    self.dropped += len(chunk)
                    log.exception(
                        "the database rejected a request-log batch: dropped %d rows and usage %s", len(chunk), lost
                    )
                finally:
                    self._flushing = 0
                rows = rows[CHUNK_ROWS:]
                first = False
            if self._down_since is not None:
                log.warning(
                    "request log: the database is back after %.1fs; wrote the %d rows held (%d dropped so far)",
                    time.monotonic() - self._down_since,
                    total,
                    self.dropped,
                )
                self._down_since = None
            return True

    def _requeue(self, usage: dict[tuple[str, str], list[int]], rows: list[dict[str, Any]], exc: Exception) -> None:
        """Put an unwritten batch back: usage always (it is owed), rows within the bound, cache entries never."""
        for (key_id, month), (tokens, requests) in usage.items():
            self.add_usage(key_id, month, tokens, requests)
        room = max(0, self._max_rows - len(self._rows))
        self.dropped += max(0, len(rows) - room)
        self._rows[:0] = rows[:room]
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "request log: the database is unavailable (%s); holding %d rows (at most %d) and all usage, "
                "retrying every %.1fs at most",
                exc,
                len(self._rows),
                self._max_rows,
                MAX_BACKOFF_S,
            )

    async def _retention(self) -> None:
        if not self._retention_days or time.monotonic() - self._last_retention < 3600:
            return
        self._last_retention = time.monotonic()
        cutoff = datetime.now(UTC) - timedelta(days=self._retention_days)
        # Bounded like every other database call (it commits chunk by chunk, so it takes no write turn).
        try:
            deleted = await self._db.run(
                lambda s: store.delete_request_logs_before(s, cutoff),
                timeout_s=max(RETENTION_TIMEOUT_S, self._db.timeout_s),
            )
        except DatabaseUnavailable as exc:
            log.warning("request log retention skipped, retrying in a minute: %s", exc)
            self._last_retention -= 3600 - 60
            return
        if deleted:
            log.info("request log retention deleted %d rows older than %s", deleted, cutoff.date())


def _writer(
    usage: dict[tuple[str, str], list[int]],
    rows: list[dict[str, Any]],
    cache: list[tuple[str, str, str, bytes, datetime]],
) -> Callable[[Any], Awaitable[None]]:
    """One transaction of the writer: usage increments, log rows, cache entries."""

    async def write(session: Any) -> None:
        for (key_id, month), (tokens, requests) in usage.items():
            await store.add_usage(session, key_id, month, tokens, requests)
        if rows:
            await store.insert_request_logs(session, rows)
        for cache_key, key_id, model, response, expires_at in cache:
            await store.cache_put(session, cache_key, key_id, model, response, expires_at)

    return write
