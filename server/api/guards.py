"""Route guards: a valid key for ``/v1``, a key whose role is ``admin`` for ``/admin``.

They run first in their router's ``before_request`` hook (:func:`guarded`), before the body is read, so a request
without a key is 401 even when its JSON is malformed. (Not as Litestar ``guards``, which copy the route handler on
every call.) A key that fails from a client address with too many failed key checks this minute gets 429 instead
of 401; a valid key is never refused for its address (``server.admission.throttle``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request, Response
from litestar.connection import ASGIConnection

from server.admission.throttle import client_address
from server.api.context import context_of
from server.auth.principal import Principal, key_from_headers
from server.errors import OpenAIError
from server.wiring.services import Services
from server.wiring.state import app_state

Hook = Callable[[Request[Any, Any, Any]], Awaitable[Response[Any] | None]]


def guarded(guard: Callable[[ASGIConnection[Any, Any, Any, Any]], Awaitable[None]], then: Hook) -> Hook:
    """A ``before_request`` hook that runs ``guard`` (raising 401/403/429), then ``then``."""

    async def hook(request: Request[Any, Any, Any]) -> Response[Any] | None:
        await guard(request)
        return await then(request)

    return hook


async def require_key(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    """Authenticate the caller; its key id goes on the request-log record (``server.api.access`` opened it)."""
    services = app_state(connection.app).services
    context = context_of(connection.scope)
    presented = key_from_headers(connection.headers.get("authorization"), connection.headers.get("x-api-key"))
    principal = services.auth.cached(presented) or await _authenticate(services, connection.scope, presented)
    context.principal = principal
    if context.record is not None:
        context.record.key_id = principal.key_id


async def _authenticate(services: Services, scope: Any, presented: str | None) -> Principal:
    """Look the key up; count a failure per address, and answer 429 instead of 401 once an address has none left.

    A key that authenticates is never refused here, whatever its address did (``server.admission.throttle``).
    """
    throttle = services.throttle
    if throttle is None or not presented:  # no key at all guesses nothing: 401, never counted
        return await services.auth.authenticate(presented)
    address = client_address(scope)
    wait_s = await throttle.exhausted(address)
    try:
        return await services.auth.authenticate(presented, lane=throttle.lane if wait_s is not None else None)
    except OpenAIError as exc:
        if exc.status != 401:
            raise
        if wait_s is not None:
            raise throttle.refusal(wait_s) from None
        await throttle.failed(address)
        raise


async def require_admin(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    """A key whose role may use ``/admin`` (403 otherwise)."""
    await require_key(connection)
    principal = context_of(connection.scope).caller()
    if not principal.role.is_admin:
        raise OpenAIError(
            403,
            "permission_error",
            f"Your key's role '{principal.role.name}' may not use the /admin routes.",
            code="model_not_allowed",
        )
