"""The application state: what one app's handlers, hooks and lifespans share, typed and stored once on the app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
from litestar import Litestar

from server.exchange.exchange import Exchange
from server.exchange.responses import Responses
from server.exchange.shutdown import Lifecycle
from server.metrics import Metrics
from server.settings import Settings
from server.wiring.models import ServedModels
from server.wiring.services import Services

_KEY = "llm_server"


@dataclass(frozen=True, slots=True)
class AppState:
    """Everything built once per app by ``server.app.create_app``.

    Attributes:
        settings: The configuration the app was built from.
        services: The gateway's collaborators (database, limits, auth, request log, cache).
        models: Every served model, local engines and remote upstreams.
        lifecycle: The drain and cut of in-flight requests at shutdown; a fatal start-up failure.
        exchange: Runs each request through admission, the cache and its model, and accounts for it.
        prepare_limiter: Worker threads that validate, render and tokenize large prompts off the event loop.
        responses: The stored responses of ``/v1/responses`` (runs their turns through ``exchange``).
    """

    settings: Settings
    services: Services
    models: ServedModels
    lifecycle: Lifecycle
    exchange: Exchange
    prepare_limiter: anyio.CapacityLimiter
    responses: Responses

    @property
    def metrics(self) -> Metrics:
        """The app's Prometheus metrics."""
        return self.services.metrics

    def as_state(self) -> dict[str, Any]:
        """The initial ``state`` of the Litestar app: this object under its one key."""
        return {_KEY: self}


def app_state(app: Litestar) -> AppState:
    """The state of ``app`` (a Litestar app built by ``create_app``)."""
    state = find_app_state(app)
    if state is None:
        raise RuntimeError("this Litestar app was not built by server.app.create_app")
    return state


def find_app_state(app: Litestar) -> AppState | None:
    """The state of ``app``, or ``None`` for an app ``create_app`` did not build."""
    state = app.state.get(_KEY)
    return state if isinstance(state, AppState) else None
