"""Route guards: a valid key for ``/v1``, a key whose role is ``admin`` for ``/admin``.

Guards run before the body is read, so a request without a key is 401 even when its JSON is malformed. A client
address with too many failed key checks this minute gets 429 before its key is looked up (``server.auth.throttle``).
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from server.api.flow import RECORD
from server.auth.principal import Principal, key_from_headers
from server.auth.throttle import client_address
from server.errors import OpenAIError
from server.requestid import request_id_of
from server.requestlog import RequestRecord
from server.services import Services


async def require_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Authenticate the caller and open its request-log record."""
    services: Services = connection.app.state.services
    state: dict[str, Any] = connection.scope.setdefault("state", {})
    if connection.scope["path"].startswith("/v1/") and RECORD not in state:
        state[RECORD] = RequestRecord(
            request_id=request_id_of(connection.scope),
            route=connection.scope.get("path_template") or connection.scope["path"],
            method=str(connection.scope.get("method", "GET")),
        )
    presented = key_from_headers(connection.headers.get("authorization"), connection.headers.get("x-api-key"))
    throttle = services.throttle
    address = client_address(connection.scope) if throttle is not None else ""
    if throttle is not None:
        await throttle.check(address)
    try:
        principal = await services.auth.authenticate(presented)
    except OpenAIError as exc:
        if throttle is not None and exc.status == 401 and presented:
            await throttle.failed(address)
        raise
    state["principal"] = principal
    if RECORD in state:
        state[RECORD].key_id = principal.key_id


async def require_admin(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """A key whose role may use ``/admin`` (403 otherwise)."""
    await require_key(connection, handler)
    principal: Principal = connection.scope["state"]["principal"]
    if not principal.role.is_admin:
        raise OpenAIError(
            403,
            "permission_error",
            f"Your key's role '{principal.role.name}' may not use the /admin routes.",
            code="model_not_allowed",
        )
