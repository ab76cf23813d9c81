"""Brute-force limiting of key checks: at most ``AUTH_FAILURES_PER_MINUTE`` failed checks per client address.

Failures are counted in a moving one-minute window of the rate-limit storage (memory, or Redis shared by every
replica). Once an address has used up its failures, *every* request from it is refused with 429 before the key is
looked at, so no database lookup happens until the oldest failure leaves the window. A request without any key
is 401 but not counted: it guesses nothing. Concurrent failing requests that start before the window is full may
overshoot it by the number in flight; the check itself stays one storage round trip.

The address is the ASGI ``client`` host. Behind a reverse proxy it is the proxy's address unless uvicorn trusts
the proxy's ``X-Forwarded-For`` (``FORWARDED_ALLOW_IPS`` / ``--forwarded-allow-ips``; uvicorn's ``proxy_headers``
is on by default and trusts only 127.0.0.1). IPv6 addresses are grouped by their /64 network, which one host
usually controls as a whole.
"""

from __future__ import annotations

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
    """Counts failed key checks per address and refuses addresses over the limit.

    Args:
        limiter: The rate-limit storage (the same one RPM/TPM use).
        per_minute: Failed checks allowed per address per minute.
        metrics: Refusals count as ``llm_server_rate_limited_total{role="anonymous",limit="auth"}``.
    """

    def __init__(self, limiter: RateLimiter, per_minute: int, metrics: Metrics) -> None:
        self._limiter = limiter
        self._limit = per_minute
        self._refused = metrics.rate_limited_total.labels(ROLE_LABEL, KIND)

    async def check(self, address: str) -> None:
        """Raise 429 when ``address`` has no failures left this minute (fails open if the storage is down)."""
        try:
            if await self._limiter.test(KIND, address, self._limit, 1):
                return
            window = await self._limiter.window(KIND, address, self._limit)
        except StorageUnavailable as exc:
            log.warning("rate-limit storage unreachable, not limiting failed key checks: %s", exc)
            return
        self._refused.inc()
        wait_s = max(window.reset_s, 0.001)
        raise OpenAIError(
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
