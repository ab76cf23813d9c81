"""Who is calling: a key looked up by its digest (cached briefly) and its role."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

from persistence.store import KeyRecord, RoleRecord
from server.auth.keys import digest, is_well_formed, redact
from server.errors import OpenAIError

if TYPE_CHECKING:
    from server.auth.static import StaticKeys

Lookup = Callable[[str], Awaitable[tuple[KeyRecord, RoleRecord] | None]]

REFRESH_AFTER = 0.75
"""Share of ``KEY_CACHE_TTL_S`` after which a cached key in use is looked up again in the background."""

log = logging.getLogger(__name__)


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

    A key in use is looked up again in the background once its entry is :data:`REFRESH_AFTER` of ``ttl_s`` old, so
    its requests never wait for the database while the entry is renewed (the bound above is unchanged: no entry is
    trusted past ``ttl_s``). Requests that need the same lookup at once share one database round trip.

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
        self._refresh_at = ttl_s * REFRESH_AFTER
        self._timeout = timeout_s
        self._max = max_entries
        self._cache: OrderedDict[str, tuple[float, KeyRecord, RoleRecord]] = OrderedDict()
        self._fetching: dict[str, asyncio.Task[tuple[KeyRecord, RoleRecord] | None]] = {}
        self._forgotten = 0  # counts forget() calls: a lookup that began before one must not fill the cache

    def forget(self, key_id: str | None = None) -> None:
        """Drop cached entries (of one key, or all) so a revoke or role change applies at once."""
        self._forgotten += 1
        self._fetching.clear()  # a lookup under way may have read the key before the change: none may join it
        if key_id is None:
            self._cache.clear()
            return
        for d in [d for d, (_, k, _) in self._cache.items() if k.id == key_id]:
            del self._cache[d]

    def cached(self, presented: str | None) -> Principal | None:
        """The principal of a key this authenticator found valid less than ``ttl_s`` ago, else ``None``.

        Never waits (what a throttle lets through without looking: a valid key must never wait behind it); it may
        start the entry's renewal in the background. A static key counts as found: it needs no lookup.
        """
        static = self._static.match(presented) if self._static else None
        if static is not None:
            return static
        if not presented:
            return None
        # Only well-formed keys enter the cache (``authenticate``), so a hit needs no format check.
        hit = self._fresh(digest(presented, self._pepper))
        if hit is None or refusal(hit[0], datetime.now(UTC)):
            return None
        return Principal(key_id=hit[0].id, key_name=hit[0].name, role=hit[1])

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
        found = self._fresh(d)
        if found is None:
            if lane is not None and d not in self._fetching:
                # A throttled address's own lookup: it waits for the lane and is cancelled with its request, so a
                # flood of guesses queues nothing that outlives it.
                lookup: Awaitable[tuple[KeyRecord, RoleRecord] | None] = self._look_up(d, lane)
            else:  # shared by every request that needs it now; it fills the cache even if they give up
                lookup = asyncio.shield(self._fetch(d))
            try:
                found = await asyncio.wait_for(lookup, self._timeout)
            except (TimeoutError, OSError, ConnectionError) as exc:
                raise database_unavailable() from exc
            if found is None:
                raise invalid_key(presented)
        key, role = found
        why = refusal(key, datetime.now(UTC))
        if why:
            raise invalid_key(presented, why)
        return Principal(key_id=key.id, key_name=key.name, role=role)

    def _fresh(self, d: str) -> tuple[KeyRecord, RoleRecord] | None:
        """The cached ``(key, role)`` of digest ``d`` if younger than ``ttl_s``; renewed in the background once it
        is :data:`REFRESH_AFTER` of that old."""
        hit = self._cache.get(d)
        if hit is None:
            return None
        age = time.monotonic() - hit[0]
        if age >= self._ttl:
            return None
        if age >= self._refresh_at and d not in self._fetching:
            self._fetch(d)
        return hit[1], hit[2]

    def _fetch(self, d: str) -> asyncio.Task[tuple[KeyRecord, RoleRecord] | None]:
        """The lookup of digest ``d`` under way, or a new one; it fills the cache when it ends, whoever waits."""
        task = self._fetching.get(d)
        if task is None or task.get_loop() is not asyncio.get_running_loop():  # (tests run loops one after another)
            task = asyncio.ensure_future(self._look_up(d, None))
            self._fetching[d] = task
            task.add_done_callback(partial(self._fetched, d))
        return task

    async def _look_up(self, d: str, lane: asyncio.Semaphore | None) -> tuple[KeyRecord, RoleRecord] | None:
        """Look ``d`` up (holding ``lane`` if given) and cache what is found; drop the entry of a digest not found."""
        began, forgotten = time.monotonic(), self._forgotten
        if lane is None:
            found = await self._lookup(d)
        else:
            async with lane:
                found = await self._lookup(d)
        if found is None:
            self._cache.pop(d, None)
        elif forgotten == self._forgotten:  # else a revoke or role change came meanwhile: do not cache a stale read
            self._cache[d] = (began, *found)
            self._cache.move_to_end(d)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return found

    def _fetched(self, d: str, task: asyncio.Task[tuple[KeyRecord, RoleRecord] | None]) -> None:
        if self._fetching.get(d) is task:
            del self._fetching[d]
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Whoever waited got it (503); a renewal in the background leaves the entry to expire at ``ttl_s``.
            log.debug("key lookup failed: %s", exc)


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
