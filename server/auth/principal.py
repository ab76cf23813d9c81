"""Who is calling: a key looked up by its digest (cached briefly) and its role."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from persistence.store import KeyRecord, RoleRecord
from server.auth.keys import digest, is_well_formed, redact
from server.errors import OpenAIError

if TYPE_CHECKING:
    from server.auth.static import StaticKeys

Lookup = Callable[[str], Awaitable[tuple[KeyRecord, RoleRecord] | None]]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated key and its role's policy."""

    key_id: str
    key_name: str
    role: RoleRecord


def invalid_key(presented: str | None, why: str = "Incorrect API key provided") -> OpenAIError:
    """401 ``invalid_api_key``; shows at most the key's prefix and last 4 characters."""
    if not presented:
        msg = "You didn't provide an API key. Provide it as 'Authorization: Bearer <key>' or in an 'X-API-Key' header."
    else:
        msg = f"{why}: {redact(presented)}."
    return OpenAIError(401, "invalid_request_error", msg, code="invalid_api_key")


def key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    """The presented key: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if x_api_key:
        return x_api_key.strip()
    return None


class Authenticator:
    """Checks presented keys. Well-formedness first (no database), then the digest, cached for ``ttl_s``.

    The cache bounds how late a revoke made on another replica takes effect (``KEY_CACHE_TTL_S``); a revoke
    made through this replica calls :meth:`forget` and takes effect at once.

    Args:
        lookup: Finds ``(key, role)`` by digest in the database.
        pepper: HMAC secret.
        ttl_s: How long a found key is trusted without asking the database again.
        timeout_s: Longest wait for the database before answering 503.
        static: Static keys (``--api-key``), matched before anything else, without the database.
    """

    def __init__(
        self,
        lookup: Lookup,
        pepper: bytes,
        *,
        ttl_s: float,
        timeout_s: float,
        max_entries: int = 10_000,
        static: StaticKeys | None = None,
    ) -> None:
        self._lookup = lookup
        self._static = static
        self._pepper = pepper
        self._ttl = ttl_s
        self._timeout = timeout_s
        self._max = max_entries
        self._cache: OrderedDict[str, tuple[float, KeyRecord, RoleRecord]] = OrderedDict()

    def forget(self, key_id: str | None = None) -> None:
        """Drop cached entries (of one key, or all) so a revoke or role change applies at once."""
        if key_id is None:
            self._cache.clear()
            return
        for d in [d for d, (_, k, _) in self._cache.items() if k.id == key_id]:
            del self._cache[d]

    def cached(self, presented: str | None) -> Principal | None:
        """The principal of a key this authenticator found valid less than ``ttl_s`` ago, else ``None``.

        No I/O: what a throttle lets through without looking (a valid key must never wait behind it). A static key
        counts as found: it needs no lookup.
        """
        static = self._static.match(presented) if self._static else None
        if static is not None:
            return static
        if not presented:
            return None
        # Only well-formed keys enter the cache (``authenticate``), so a hit needs no format check.
        hit = self._cache.get(digest(presented, self._pepper))
        if hit is None or time.monotonic() - hit[0] >= self._ttl or refusal(hit[1], datetime.now(UTC)):
            return None
        return Principal(key_id=hit[1].id, key_name=hit[1].name, role=hit[2])

    async def authenticate(self, presented: str | None, *, lane: asyncio.Semaphore | None = None) -> Principal:
        """Return the principal or raise 401 (bad key) / 503 (database unreachable).

        Args:
            presented: The key as sent.
            lane: Held around the database lookup, if one is needed (the throttle's lane for throttled addresses);
                the wait for it counts into the database timeout.
        """
        static = self._static.match(presented) if self._static else None
        if static is not None:
            return static
        if not presented or not is_well_formed(presented):
            raise invalid_key(presented)
        d = digest(presented, self._pepper)
        now = time.monotonic()
        hit = self._cache.get(d)
        if hit is not None and now - hit[0] < self._ttl:
            key, role = hit[1], hit[2]
        else:
            try:
                found = await asyncio.wait_for(self._look_up(d, lane), self._timeout)
            except (TimeoutError, OSError, ConnectionError) as exc:
                raise database_unavailable() from exc
            if found is None:
                self._cache.pop(d, None)
                raise invalid_key(presented)
            key, role = found
            self._cache[d] = (now, key, role)
            self._cache.move_to_end(d)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        why = refusal(key, datetime.now(UTC))
        if why:
            raise invalid_key(presented, why)
        return Principal(key_id=key.id, key_name=key.name, role=role)

    async def _look_up(self, d: str, lane: asyncio.Semaphore | None) -> tuple[KeyRecord, RoleRecord] | None:
        if lane is None:
            return await self._lookup(d)
        async with lane:
            return await self._lookup(d)


def refusal(key: KeyRecord, now: datetime) -> str | None:
    """Why ``key`` may not be used at ``now`` (revoked, expired, rotated past its grace), or ``None``."""
    if key.revoked_at is not None and key.revoked_at <= now:
        return "This API key has been revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "This API key has expired"
    if key.grace_until is not None and key.grace_until <= now:
        return "This API key was rotated and its grace period has ended"
    return None


def database_unavailable() -> OpenAIError:
    """503 when the database does not answer in time."""
    return OpenAIError(
        503,
        "server_error",
        "The database is unavailable; retry shortly.",
        code="service_unavailable",
        headers={"retry-after": "5"},
    )
