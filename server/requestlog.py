"""The request log and usage accounting, written in batches off the hot path.

Handlers fill a :class:`RequestRecord` per ``/v1`` request; when the response (or the stream) ends it is queued.
One background task flushes queued rows, usage increments (summed per key and month) and cache entries every
``interval_s`` in one transaction. The queue is bounded: when the database falls behind, new log rows are
dropped and counted (usage increments are never dropped: they are sums, not rows). Everything queued is
flushed on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from persistence import store
from server.database import Database, DatabaseUnavailable

log = logging.getLogger("server.requestlog")


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
    error_type: str | None = None
    prompt_text: str | None = None
    output_text: str | None = None
    streaming: bool = False
    done: bool = False

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
        """Stop the loop and flush what is queued."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
                await self._retention()
            except Exception:  # keep the writer alive whatever one flush hit
                log.exception("request log flush failed")

    async def flush(self) -> None:
        """Write everything queued now (tests call this to observe the database)."""
        async with self._lock:
            rows, self._rows = self._rows, []
            usage, self._usage = self._usage, defaultdict(lambda: [0, 0])
            cache, self._cache = self._cache, []
            if not (rows or usage or cache):
                return

            async def write(session: Any) -> None:
                for (key_id, month), (tokens, requests) in usage.items():
                    await store.add_usage(session, key_id, month, tokens, requests)
                if rows:
                    await store.insert_request_logs(session, rows)
                for cache_key, key_id, model, response, expires_at in cache:
                    await store.cache_put(session, cache_key, key_id, model, response, expires_at)

            try:
                await self._db.run(write, timeout_s=30, write=True)
            except DatabaseUnavailable as exc:
                # Keep usage (it is owed); requeue rows within the bound; cache entries are optional.
                log.warning("request log flush failed, will retry: %s", exc)
                for k, (tokens, requests) in usage.items():
                    self.add_usage(k[0], k[1], tokens, requests)
                room = max(0, self._max_rows - len(self._rows))
                self.dropped += max(0, len(rows) - room)
                self._rows[:0] = rows[:room]

    async def _retention(self) -> None:
        if not self._retention_days or time.monotonic() - self._last_retention < 3600:
            return
        self._last_retention = time.monotonic()
        cutoff = datetime.now(UTC) - timedelta(days=self._retention_days)
        async with self._db.session() as session:
            deleted = await store.delete_request_logs_before(session, cutoff)
        if deleted:
            log.info("request log retention deleted %d rows older than %s", deleted, cutoff.date())
