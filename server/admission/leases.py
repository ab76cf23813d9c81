"""Quota leases: a replica reserves a busy key's monthly quota a few requests ahead (PostgreSQL deployments).

On PostgreSQL every metered request used to cost one committed statement on its path (the conditional upsert of
``persistence.usage``). With leases, a key whose requests keep coming reserves several requests' worth in one
statement (``ahead`` times its request's tokens, and ``ahead`` requests) and serves the next requests from that
slice in memory, with no I/O; a request's unused reservation, once it ends, goes back into the slice too.

- **Never over the quota.** Whatever a lease holds was reserved in the database first, by the same conditional
  statement as a single request, so replicas together never pass a limit; a lease only counts early.
- **Sized by demand.** A key starts exact (``ahead`` 1: one statement per request, as without leases) and doubles
  its ``ahead`` each time it needs the database again within :data:`IDLE_S` of its last reservation, up to the
  bound (``QUOTA_LEASE_REQUESTS``). A key that sends a request now and then is never leased more than it uses.
- **Near the limit, exact.** A lease the database refuses is followed at once by the request's own reservation
  (a second statement, that time only), and the key stays exact for :data:`EXACT_HOLD_S`.
- **Given back.** A lease's unused part counts as used in the database (what the usage routes show, and what other
  replicas cannot reserve) until it is given back: when its key has been idle for :data:`IDLE_S` (written with
  the request log's next batch), when the role's limits change, and at shutdown. A replica that crashes leaves
  its leases' unused part counted for the month, as it leaves the reservations of the requests it was running.
- **One owner.** All of it runs on the event loop: the check and the take from a slice have no ``await``
  between them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

IDLE_S = 2.0
"""A lease not used for this long is given back; a key that needs the database again sooner leases more ahead."""
EXACT_HOLD_S = 30.0
"""After the database refused a lease, how long its key reserves one request at a time."""

DbReserve = Callable[[str, str, int, int, int | None, int | None], Awaitable[bool]]
"""``(key_id, month, tokens, requests, max_tokens, max_requests) -> reserved``: the database's conditional upsert
(``requests`` may be 0: tokens only, for a request whose lease holds a request but too few tokens)."""
Record = Callable[[str, str, int, int], None]
"""``(key_id, month, token_delta, request_delta)``: usage queued for the database (the batched writer)."""


@dataclass(slots=True)
class Lease:
    """What this replica holds of one key's month, reserved in the database and not used yet."""

    limits: tuple[int | None, int | None]
    """The role's monthly token and request limits it was reserved under."""
    used_at: float
    tokens: int = 0
    requests: int = 0
    ahead: int = 1
    """Requests the next reservation takes at once."""
    reserved_at: float = float("-inf")
    exact_until: float = float("-inf")


class QuotaLeases:
    """Monthly quota reservations for PostgreSQL, a few requests ahead for busy keys (see the module docstring).

    Its :meth:`reserve` and :meth:`settle` take the place of the database reservation and of the writer's usage
    increments in the gateway; :meth:`give_back` runs before each of the writer's flushes.

    Args:
        reserve: The database's conditional reservation.
        record: Where usage deltas are queued (the batched writer's ``add_usage``).
        ahead: Most requests one reservation takes (1: no leases, one statement per request).
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(
        self, reserve: DbReserve, record: Record, *, ahead: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if ahead < 1:
            raise ValueError(f"ahead must be >= 1, got {ahead}")
        self._reserve = reserve
        self._record = record
        self._ahead = ahead
        self._clock = clock
        self._leases: dict[tuple[str, str], Lease] = {}

    def held(self, key_id: str, month: str) -> tuple[int, int]:
        """Tokens and requests this replica holds of ``key_id``'s ``month`` unused."""
        lease = self._leases.get((key_id, month))
        return (lease.tokens, lease.requests) if lease is not None else (0, 0)

    async def reserve(
        self, key_id: str, month: str, tokens: int, max_tokens: int | None, max_requests: int | None
    ) -> bool:
        """Count one request and ``tokens``: from this key's lease if it holds enough, else in the database."""
        now = self._clock()
        k = (key_id, month)
        limits = (max_tokens, max_requests)
        lease = self._leases.get(k)
        if lease is not None and lease.limits != limits:  # the role changed: what it holds was sized for the old one
            self._drop(k, lease)
            lease = None
        if lease is None:
            lease = self._leases[k] = Lease(limits, used_at=now)
        lease.used_at = now
        if lease.requests >= 1 and lease.tokens >= tokens:
            lease.requests -= 1
            lease.tokens -= tokens
            return True
        ahead = self._ahead_for(lease, now, tokens)
        lease.reserved_at = now
        if ahead > 1:
            if await self._from_database(k, lease, tokens, ahead):
                return True
            lease.ahead = 1  # near the limit: exact for a while
            lease.exact_until = now + EXACT_HOLD_S
        return await self._from_database(k, lease, tokens, 1)

    async def _from_database(self, k: tuple[str, str], lease: Lease, tokens: int, ahead: int) -> bool:
        """Reserve ``ahead`` requests of ``tokens`` for this request and the lease: what the lease holds counts
        (taken out while the statement runs, put back if it fails), the database reserves the rest."""
        want_tokens, want_requests = tokens * ahead, ahead
        held_tokens, held_requests = min(lease.tokens, want_tokens), min(lease.requests, want_requests)
        lease.tokens -= held_tokens
        lease.requests -= held_requests
        max_tokens, max_requests = lease.limits
        try:
            reserved = await self._reserve(
                k[0], k[1], want_tokens - held_tokens, want_requests - held_requests, max_tokens, max_requests
            )
        except BaseException:
            self._keep(k, lease, held_tokens, held_requests)
            raise
        if reserved:
            self._keep(k, lease, want_tokens - tokens, want_requests - 1)  # beyond this request
        else:
            self._keep(k, lease, held_tokens, held_requests)
        return reserved

    def _ahead_for(self, lease: Lease, now: float, tokens: int) -> int:
        """Requests to reserve now: doubled for a key back within IDLE_S, bounded by the limits themselves."""
        if now < lease.exact_until:
            return 1
        if now - lease.reserved_at < IDLE_S:
            lease.ahead = min(lease.ahead * 2, self._ahead)
        else:
            lease.ahead = 1
        ahead = lease.ahead
        max_tokens, max_requests = lease.limits
        if max_tokens is not None and tokens > 0:
            ahead = min(ahead, max_tokens // tokens)
        if max_requests is not None:
            ahead = min(ahead, max_requests)
        return max(ahead, 1)

    def _keep(self, k: tuple[str, str], lease: Lease, tokens: int, requests: int) -> None:
        """Put ``tokens`` and ``requests`` (reserved in the database) into the lease, or give them back if the lease is
        gone (given back or replaced while a statement was in flight)."""
        if self._leases.get(k) is lease:
            lease.tokens += tokens
            lease.requests += requests
        else:
            self._record(k[0], k[1], -tokens, -requests)

    def settle(self, key_id: str, month: str, tokens: int, requests: int) -> None:
        """A request's usage delta (negative: what its reservation did not use), taken from or put back into the
        key's lease if it holds one; what the lease cannot cover is queued for the database."""
        lease = self._leases.get((key_id, month))
        if lease is None:
            self._record(key_id, month, tokens, requests)
            return
        lease.used_at = self._clock()
        lease.tokens -= tokens
        lease.requests -= requests
        owed_tokens, owed_requests = max(0, -lease.tokens), max(0, -lease.requests)
        if owed_tokens or owed_requests:
            lease.tokens += owed_tokens
            lease.requests += owed_requests
            self._record(key_id, month, owed_tokens, owed_requests)

    def give_back(self, everything: bool = False) -> None:
        """Give back the leases idle for :data:`IDLE_S` (all of them when ``everything``: at shutdown)."""
        if not self._leases:
            return
        now = self._clock()
        for k, lease in list(self._leases.items()):
            if everything or now - lease.used_at >= IDLE_S:
                self._drop(k, lease)

    def _drop(self, k: tuple[str, str], lease: Lease) -> None:
        del self._leases[k]
        if lease.tokens or lease.requests:
            self._record(k[0], k[1], -lease.tokens, -lease.requests)
