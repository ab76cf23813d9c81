"""Completion cache for deterministic requests (temperature 0 or an explicit seed), scoped per key.

One implementation for every model, local or remote. The key hashes the caller's key id, the model and what the
request says determines its output (:meth:`Work.cache_material`: a local plan's prompt token ids and every
sampling parameter; a remote call's whole forwarded body), so one tenant never receives another's output and a
different parameter never hits. An entry keeps the prompt tokens and each choice's text, finish reason and
completion tokens. Hits still pass admission (rate limits) and are logged; the cache fails open (a database error
is a miss, and so is an entry that does not decode). Entries are written by the writer's batches; until then
they are served from the writer's queue, so a request repeated at once hits. Expired entries are deleted by the
writer's retention pass.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import msgspec

from persistence import store
from server.records.database import Database, DatabaseUnavailable, describe_error
from server.serving.plan import CacheEntry

log = logging.getLogger("server.cache")

_VERSION = 3


def cache_key(key_id: str, model: str, material: object) -> str:
    """sha256 over the caller's key, the served model and everything that determines the output."""
    blob = msgspec.msgpack.encode([_VERSION, key_id, model, material], order="sorted")
    return hashlib.sha256(blob).hexdigest()


_Stored = tuple[int, list[tuple[str, str, int]]]
"""``[prompt_tokens, [[text, finish_reason, completion_tokens], ...]]``"""


def encode_entry(entry: CacheEntry) -> bytes:
    return msgspec.msgpack.encode((entry.prompt_tokens, entry.results))


def decode_entry(blob: bytes) -> CacheEntry | None:
    """The entry ``blob`` holds, or ``None`` when it is not one of ours."""
    try:
        prompt_tokens, results = msgspec.msgpack.decode(blob, type=_Stored)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return CacheEntry(prompt_tokens, results)


class CompletionCache:
    """Reads the cache on the request path; writes go through the writer's batches.

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

    async def get(self, key: str) -> CacheEntry | None:
        """The entry stored under ``key`` (``None``: a miss, an expired or foreign entry, an unavailable database)."""
        if self._queued is not None and (queued := self._queued(key)) is not None:
            return decode_entry(queued)

        async def read(session: object) -> bytes | None:
            return await store.cache_get(session, key, datetime.now(UTC))  # type: ignore[arg-type]

        try:
            blob = await self._db.run(read, timeout_s=self._timeout)
        except DatabaseUnavailable as exc:
            log.warning("completion cache unavailable, treating as a miss: %s", describe_error(exc))
            return None
        return None if blob is None else decode_entry(blob)
