"""The per-request context: what the middleware, the guards and the handlers of one request share.

Litestar keeps per-request values in ``scope["state"]``, a plain dict; everything this server keeps there is one
typed :class:`RequestContext` under one key, reached only through :func:`context_of`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.auth.principal import Principal
from server.records.writer import RequestRecord

_KEY = "llm_server"


@dataclass(slots=True)
class RequestContext:
    """One request's shared state.

    Attributes:
        record: Its request-log row (``/v1`` requests only), queued when the response (or the stream) ends.
        principal: The authenticated caller, once a guard has checked its key.
        screened_model: The model whose allowlist and requests-per-minute window were already checked before the
            body was decoded (``server.api.gate.screen``).
    """

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
