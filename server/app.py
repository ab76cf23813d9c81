"""The application factory: ``create_app(settings, engine=...)`` wires everything explicitly (no globals)."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import MutableScopeHeaders
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import Message, Scope

from server.api.common import strict_body
from server.api.exceptions import handle_exception
from server.api.health import health, metrics, readyz
from server.api.models import list_models, retrieve_model
from server.api.native import generate_text, stream_text
from server.api.openai import create_chat_completion, create_completion
from server.engine.base import Engine
from server.errors import OpenAIError
from server.metrics import Metrics
from server.settings import Settings, load_settings

log = logging.getLogger("server")

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_of(scope: Scope) -> str:
    """The request's id: the client's ``x-request-id`` when it is a sane token, else a new one (cached)."""
    state = scope.setdefault("state", {})
    rid = state.get("request_id")
    if rid is None:
        supplied = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), b"").decode("latin-1")
        rid = supplied if _SANE_REQUEST_ID.match(supplied) else f"req_{secrets.token_hex(12)}"
        state["request_id"] = rid
    return str(rid)


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> Litestar:
    """Build the ASGI app.

    Args:
        settings: Configuration; read from the environment when ``None``.
        engine: The model runtime; built from ``settings`` when ``None`` (tests pass a ``FakeEngine``).
    """
    settings = settings or load_settings()
    if engine is None:
        from server.engine.factory import build_engine

        engine = build_engine(settings)
    the_engine: Engine = engine
    app_metrics = Metrics()

    async def load_engine(app: Litestar) -> None:
        try:
            await the_engine.start()
        except Exception as exc:  # readiness reports it; the process keeps answering /health
            log.error("model failed to load: %s", exc, exc_info=exc)
            app.state.engine_failure = str(exc)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        loader = asyncio.create_task(load_engine(app))
        try:
            yield
        finally:
            loader.cancel()
            await the_engine.stop()

    async def before_send(message: Message, scope: Scope) -> None:
        if message["type"] == "http.response.start":
            headers = MutableScopeHeaders.from_message(message)
            headers["x-request-id"] = request_id_of(scope)
            route = scope.get("path_template") or "unmatched"
            app_metrics.requests_total.labels(route, scope.get("method", ""), str(message["status"])).inc()

    def ready_engine() -> Engine:
        if not the_engine.ready:
            raise OpenAIError(
                503,
                "server_error",
                "The model is still loading; retry shortly.",
                code="model_not_ready",
                headers={"retry-after": "5"},
            )
        return the_engine

    cors = CORSConfig(allow_origins=settings.cors_origins) if settings.cors_origins else None
    return Litestar(
        route_handlers=[
            health,
            readyz,
            metrics,
            list_models,
            retrieve_model,
            create_chat_completion,
            create_completion,
            generate_text,
            stream_text,
        ],
        dependencies={
            "engine": Provide(ready_engine, sync_to_thread=False),
            "metrics": Provide(lambda: app_metrics, sync_to_thread=False),
        },
        exception_handlers={Exception: handle_exception},
        before_request=strict_body,
        before_send=[before_send],
        lifespan=[lifespan],
        request_max_body_size=settings.request_max_body_size,
        logging_config=None,
        cors_config=cors,
        openapi_config=OpenAPIConfig(
            title="llm-server",
            version="0.1.0",
            path="/schema",
            components=Components(
                security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer", bearer_format="API key")}
            ),
        ),
        state=_initial_state(settings, the_engine, app_metrics),
    )


def _initial_state(settings: Settings, engine: Engine, metrics: Metrics) -> Any:
    from litestar.datastructures import State

    return State({"settings": settings, "engine_ref": engine, "metrics": metrics, "engine_failure": None})
