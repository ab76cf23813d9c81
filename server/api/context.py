"""The per-request context: what the middleware, the guards and the handlers of one request share.

Litestar keeps per-request values in ``scope["state"]``, a plain dict; everything this server keeps there is one
typed :class:`RequestContext` under one key, reached only through :func:`context_of`.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from server.auth.principal import Principal
from server.records.record import RequestRecord

_KEY = "llm_server"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass(slots=True)
class RequestContext:
    """One request's shared state.

    Attributes:
        request_id: Its id (:func:`request_id_of`), decided once.
        record: Its request-log row (``/v1`` requests only), queued when the response (or the stream) ends.
        principal: The authenticated caller, once a guard has checked its key.
        screened_model: The model whose allowlist and requests-per-minute window were already checked before the
            body was decoded (``server.api.gate.screen``).
    """

    request_id: str | None = None
    record: RequestRecord | None = None
    principal: Principal | None = None
    screened_model: str | None = None

    def caller(self) -> Principal:
        """The authenticated caller (routes behind the key guard always have one)."""
        if self.principal is None:
            raise RuntimeError("no authenticated caller: the route is not behind the key guard")
        return self.principal


def context_of(scope: Any) -> RequestContext:
    """The context of the request ``scope`` belongs to (created on first use)."""
    state: dict[str, Any] = scope.setdefault("state", {})
    context: RequestContext | None = state.get(_KEY)
    if context is None:
        context = state[_KEY] = RequestContext()
    return context


def request_id_of(scope: Any) -> str:
    """The request's id: the client's ``x-request-id`` when it is a sane token, else a new one; decided once."""
    context = context_of(scope)
    if context.request_id is None:
        supplied = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), b"").decode("latin-1")
        context.request_id = supplied if _SANE_REQUEST_ID.match(supplied) else f"req_{secrets.token_hex(12)}"
    return context.request_id
