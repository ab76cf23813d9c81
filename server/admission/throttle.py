"""Brute-force limiting of key checks: at most ``AUTH_FAILURES_PER_MINUTE`` failed checks per client address.

Failures are counted in a moving one-minute window of the rate-limit storage (memory, or Redis shared by every
replica). The throttle refuses only keys that do not authenticate; a valid key is never refused by it, whatever its
address did (one reverse proxy or NAT address is often shared by every client):

* a key in the authenticator's positive cache authenticates without consulting the throttle at all (no storage
  round trip, no database);
* any other key is looked up as usual. From an address that has used up its failures, a key that does not
  authenticate (unknown, malformed, revoked, expired, rotated) gets 429 instead of 401 and is not counted again;
  one that authenticates gets through;
* a request without any key is 401 and never counted: it guesses nothing.

What a throttled brute-forcer still costs: each well-formed guess costs one HMAC-SHA-256 and one indexed lookup by
digest, as before it was throttled (a malformed guess costs neither: prefix, length and checksum are checked
first). Its lookups, however, go through a narrow lane (:data:`THROTTLED_LOOKUPS` at a time per replica, shared by
every throttled address), so however many requests it sends, it holds at most that many database connections and
leaves the rest of the pool to everyone else; a valid, uncached key from a throttled address waits its turn in
that lane (within the database timeout, after which it is a 503 like any slow lookup).

The address is the ASGI ``client`` host. Behind a reverse proxy it is the proxy's address unless uvicorn trusts
the proxy's ``X-Forwarded-For`` (``FORWARDED_ALLOW_IPS`` / ``--forwarded-allow-ips``; uvicorn's ``proxy_headers``
is on by default and trusts only 127.0.0.1). IPv6 addresses are grouped by their /64 network, which one host
usually controls as a whole.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
from typing import Any

from server.admission.ratelimit import RateLimiter, StorageUnavailable, duration
from server.errors import OpenAIError
from server.metrics import Metrics

log = logging.getLogger("server.auth")

KIND = "auth"
ROLE_LABEL = "anonymous"
THROTTLED_LOOKUPS = 2
"""Key lookups at a time (per replica) for keys presented from addresses that used up their failures."""


def client_address(scope: Any) -> str:
    """The address failures are counted under: the client host, an IPv6 host as its /64 network."""
    client = scope.get("client")
    host = str(client[0]) if client else "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class AuthThrottle:
    """Counts failed key checks per address and refuses keys that fail from addresses over the limit.

    Args:
        limiter: The rate-limit storage (the same one RPM/TPM use).
        per_minute: Failed checks allowed per address per minute.
        metrics: Refusals count as ``llm_server_rate_limited_total{role="anonymous",limit="auth"}``.
        lookups: Database lookups at a time for keys presented from throttled addresses.
    """

    def __init__(
        self, limiter: RateLimiter, per_minute: int, metrics: Metrics, lookups: int = THROTTLED_LOOKUPS
    ) -> None:
        self._limiter = limiter
        self._limit = per_minute
        self._refused = metrics.rate_limited_total.labels(ROLE_LABEL, KIND)
        self.lane = asyncio.Semaphore(lookups)
        """Held around each key lookup from a throttled address."""

    async def exhausted(self, address: str) -> float | None:
        """Seconds until ``address`` has a failure left, or ``None`` while it has (also when the storage is down)."""
        try:
            if await self._limiter.test(KIND, address, self._limit, 1):
                return None
            window = await self._limiter.window(KIND, address, self._limit)
        except StorageUnavailable as exc:
            log.warning("rate-limit storage unreachable, not limiting failed key checks: %s", exc)
            return None
        return max(window.reset_s, 0.001)

    def refusal(self, wait_s: float) -> OpenAIError:
        """The 429 for a key that failed from an address with no failures left (counted in the metrics)."""
        self._refused.inc()
        return OpenAIError(
            429,
            "requests",
            f"Too many failed API key checks from your address; please try again in {duration(wait_s)}.",
            code="rate_limit_exceeded",
            headers={"retry-after": str(max(1, math.ceil(wait_s))), "retry-after-ms": str(math.ceil(wait_s * 1000))},
        )

    async def failed(self, address: str) -> None:
        """Count one failed check of ``address``."""
        try:
            await self._limiter.hit(KIND, address, self._limit, 1)
        except StorageUnavailable as exc:
            log.warning("rate-limit storage unreachable, failed key check not counted: %s", exc)
