"""Completion cache for deterministic requests (temperature 0 or an explicit seed), scoped per key.

The key hashes the caller's key id, the model, the endpoint family, the prompt token ids and every parameter
that shapes the output, so one tenant never receives another's output and a different parameter never hits.
Hits still pass admission (rate limits) and are logged; the cache fails open (a database error is a miss).
Entries are written by the request-log writer's batches; until then they are served from the writer's queue, so a
request repeated at once hits. Expired entries are deleted by the writer's retention pass.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec

from persistence import store
from server.records.database import Database, DatabaseUnavailable, describe_error
from server.serving.common import Plan

log = logging.getLogger("server.exchange.cache")

Results = list[tuple[str, str, int]]
_VERSION = 2


def cache_key(key_id: str, plan: Plan) -> str:
    """sha256 over everything that determines the output."""
    material = msgspec.msgpack.encode(
        [
            _VERSION,
            key_id,
            plan.model,
            plan.kind,
            plan.prompts,
            plan.params,  # every sampling field, penalties, bias and output constraint included
            plan.n,
            plan.stops,
        ]
    )
    return hashlib.sha256(material).hexdigest()


def encode_results(plan: Plan) -> bytes:
    return msgspec.msgpack.encode([[c.text, c.finish_reason or "stop", c.completion_tokens] for c in plan.choices])


class CompletionCache:
    """Reads the cache on the request path; writes go through the request-log writer's batches.

    Args:
        db: Where entries are read.
        ttl_s: Lifetime of an entry.
        timeout_s: Longest wait for a read (a slow database is a miss).
        queued: Entries written but not stored yet (the writer's queue), consulted before the database.
    """

    def __init__(
        self,
        db: Database,
        *,
        ttl_s: int,
        timeout_s: float = 1.0,
        queued: Callable[[str], bytes | None] | None = None,
    ) -> None:
        self._db = db
        self.ttl_s = ttl_s
        self._timeout = timeout_s
        self._queued = queued

    async def get(self, key: str) -> Results | None:
        raw = await self.get_raw(key)
        if raw is None:
            return None
        return [(str(t), str(f), int(n)) for t, f, n in msgspec.msgpack.decode(raw)]

    async def get_raw(self, key: str) -> bytes | None:
        """The stored entry as written (``None`` for a miss, an expired entry or an unavailable database)."""
        if self._queued is not None and (queued := self._queued(key)) is not None:
            return queued

        async def read(session: object) -> bytes | None:
            return await store.cache_get(session, key, datetime.now(UTC))  # type: ignore[arg-type]

        try:
            return await self._db.run(read, timeout_s=self._timeout)
        except DatabaseUnavailable as exc:
            log.warning("completion cache unavailable, treating as a miss: %s", describe_error(exc))
            return None
