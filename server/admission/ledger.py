"""Exact monthly quotas for a single process without a database write per request (SQLite deployments).

SQLite serves one process, so this process can own the counters: each (key, month) is loaded from the database
once, reservations and reconciliations change it in memory (atomically: there is no ``await`` between the check
and the update), and every change is also queued to the batched request-log writer, which persists it exactly
once (its units are idempotent). A reservation never waits for the database, so it has no lost answer to undo.
With PostgreSQL (several replicas) the gateway reserves in the database instead, with one conditional upsert.
"""

from __future__ import annotations

import asyncio

from persistence import store
from server.records.writer import BatchWriter


class LocalLedger:
    """In-memory usage counters, authoritative for this process, persisted through the writer."""

    def __init__(self, writer: BatchWriter) -> None:
        self._writer = writer
        self._usage: dict[tuple[str, str], list[int]] = {}
        self._loading: dict[tuple[str, str], asyncio.Lock] = {}

    async def _entry(self, key_id: str, month: str) -> list[int]:
        k = (key_id, month)
        entry = self._usage.get(k)
        if entry is not None:
            return entry
        lock = self._loading.setdefault(k, asyncio.Lock())
        async with lock:
            if k not in self._usage:
                # The row read holds everything queued before the writer's flush; what was queued since (a
                # settlement while this loads) is still in the writer, counted once here and written later.
                rows, tokens, requests = await self._writer.read_flushed(
                    lambda s: store.get_usage(s, key_id, month), key_id, month
                )
                if rows:
                    tokens, requests = tokens + rows[0].tokens, requests + rows[0].requests
                self._usage[k] = [max(0, tokens), max(0, requests)]
        self._loading.pop(k, None)
        return self._usage[k]

    async def reserve(
        self, key_id: str, month: str, tokens: int, max_tokens: int | None, max_requests: int | None
    ) -> bool:
        """Count one request and ``tokens`` if both stay within the limits."""
        entry = await self._entry(key_id, month)
        if max_tokens is not None and entry[0] + tokens > max_tokens:
            return False
        if max_requests is not None and entry[1] + 1 > max_requests:
            return False
        entry[0] += tokens
        entry[1] += 1
        self._writer.add_usage(key_id, month, tokens, 1)
        return True

    def settle(self, key_id: str, month: str, tokens: int, requests: int) -> None:
        """Record usage (a reconciliation delta, or usage of a key without quotas) here and in the database."""
        entry = self._usage.get((key_id, month))
        if entry is not None:
            entry[0] = max(0, entry[0] + tokens)
            entry[1] = max(0, entry[1] + requests)
        self._writer.add_usage(key_id, month, tokens, requests)
