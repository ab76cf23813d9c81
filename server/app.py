"""The application factory: ``create_app(settings, engine=...)`` wires everything explicitly (no globals)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response, Router
from litestar.config.cors import CORSConfig
from litestar.datastructures import MutableScopeHeaders, State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components
from litestar.types import Message, Scope

from persistence import migrate
from server.api.access import timing_middleware
from server.api.admin import admin_handlers
from server.api.apidoc import KEY_SECURITY, SECURITY_SCHEMES, StructBoundsPlugin
from server.api.common import read_timeout_middleware, strict_body
from server.api.exceptions import handle_exception
from server.api.flow import RECORD
from server.api.guards import require_key
from server.api.health import broken_engine_reason, health, metrics, readyz
from server.api.models import list_models, retrieve_model
from server.api.native import generate_text, stream_text
from server.api.openai import create_chat_completion, create_completion
from server.engine.base import Engine
from server.errors import OpenAIError
from server.lifecycle import CANCEL_MARGIN_S, Lifecycle, shutting_down
from server.metrics import Metrics, status_class
from server.requestid import request_id_of
from server.requestlog import RequestRecord
from server.services import Services, build_services
from server.settings import Settings, load_settings

log = logging.getLogger("server")


def create_app(
    settings: Settings | None = None, *, engine: Engine | None = None, services: Services | None = None
) -> Litestar:
    """Build the ASGI app.

    Args:
        settings: Configuration; read from the environment when ``None``.
        engine: The model runtime; built from ``settings`` when ``None`` (tests pass a ``FakeEngine``).
        services: The gateway (database, limits, auth, log); built from ``settings`` when ``None``.
    """
    settings = settings or load_settings()
    if engine is None:
        from server.engine.factory import build_engine

        engine = build_engine(settings)
    the_engine: Engine = engine
    app_metrics = services.metrics if services is not None else Metrics()
    the_services = services or build_services(settings, app_metrics)
    lifecycle = Lifecycle()

    async def load_engine(app: Litestar) -> None:
        try:
            await the_engine.start()
            app_metrics.watch_engine(
                the_engine.info.name, lambda: float(the_engine.num_running), lambda: float(the_engine.num_waiting)
            )
        except Exception as exc:  # readiness reports it; `llm-server serve` then exits non-zero
            reason = load_failure_reason(settings.model, exc)
            log.error("model %r failed to load: %s", settings.model, reason)
            log.debug("model load failure", exc_info=exc)
            app.state.engine_failure = reason
            lifecycle.fail(f"model {settings.model!r} failed to load: {reason}")

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if settings.auto_migrate:
            default_role = {
                "rpm": settings.default_role_rpm,
                "tpm": settings.default_role_tpm,
                "max_concurrency": settings.default_role_max_concurrency,
            }
            await migrate.upgrade(settings.database, default_role=default_role)
        the_services.writer.start()
        loader = asyncio.create_task(load_engine(app))
        try:
            yield
        finally:
            loader.cancel()
            # Requests cut by a shutdown settle (usage, request log) before the engine and the writer stop.
            if not await lifecycle.wait_idle(CANCEL_MARGIN_S):
                log.warning("shutdown: %d request(s) still running; stopping the engine anyway", lifecycle.in_flight)
            await the_engine.stop()
            await the_services.writer.stop()
            await the_services.db.close()
            the_services.limiter.close()

    async def before_send(message: Message, scope: Scope) -> None:
        if message["type"] != "http.response.start":
            return
        headers = MutableScopeHeaders.from_message(message)
        headers["x-request-id"] = request_id_of(scope)
        status = message["status"]
        route = scope.get("path_template") or "unmatched"
        app_metrics.requests_total.labels(route, scope.get("method", ""), status_class(status)).inc()
        state: dict[str, Any] = scope.get("state", {})
        principal = state.get("principal")
        if principal is not None and scope["path"].startswith("/v1/") and "x-ratelimit-limit-requests" not in headers:
            for name, value in (await the_services.gateway.headers(principal)).items():
                headers[name] = value
        record: RequestRecord | None = state.get(RECORD)
        if record is not None:
            record.status = status
            if not record.streaming or status >= 400:
                the_services.writer.add_row(record)

    async def before_request(request: Request[Any, Any, Any]) -> Response[Any] | None:
        path = request.scope["path"]
        if lifecycle.draining and path not in ("/health", "/metrics"):
            if path == "/readyz":  # takes this replica out of a load balancer's rotation
                return Response({"status": "draining", "reason": "the server is shutting down"}, status_code=503)
            raise shutting_down()
        await strict_body(request)
        return None

    def ready_engine() -> Engine:
        if not the_engine.ready:
            broken = broken_engine_reason(the_engine)
            raise OpenAIError(
                503,
                "server_error",
                f"The model failed and this server cannot generate: {broken}"
                if broken
                else "The model is still loading; retry shortly.",
                code="model_failed" if broken else "model_not_ready",
                headers={"retry-after": "5"},
            )
        return the_engine

    v1 = Router(
        path="/",
        guards=[require_key],
        route_handlers=[
            list_models,
            retrieve_model,
            create_chat_completion,
            create_completion,
            generate_text,
            stream_text,
        ],
        security=KEY_SECURITY,
    )
    cors = CORSConfig(allow_origins=settings.cors_origins) if settings.cors_origins else None
    return Litestar(
        route_handlers=[health, readyz, metrics, v1, *admin_handlers()],
        dependencies={
            "engine": Provide(ready_engine, sync_to_thread=False),
            "metrics": Provide(lambda: app_metrics, sync_to_thread=False),
            "services": Provide(lambda: the_services, sync_to_thread=False),
        },
        exception_handlers={Exception: handle_exception},
        before_request=before_request,
        middleware=[timing_middleware(app_metrics), read_timeout_middleware(settings.request_read_timeout_s)],
        before_send=[before_send],
        lifespan=[lifespan],
        request_max_body_size=settings.request_max_body_size,
        logging_config=None,
        cors_config=cors,
        plugins=[StructBoundsPlugin()],  # OpenAPI: msgspec bounds Litestar drops (server.api.apidoc)
        openapi_config=OpenAPIConfig(
            title="llm-server",
            version="0.1.0",
            path="/schema",
            components=Components(security_schemes=SECURITY_SCHEMES),
        ),
        state=State(
            {
                "settings": settings,
                "engine_ref": the_engine,
                "metrics": app_metrics,
                "services": the_services,
                "engine_failure": None,
                "lifecycle": lifecycle,
            }
        ),
    )


def load_failure_reason(model: str, exc: BaseException) -> str:
    """One line saying why ``model`` did not load (the hub's own wording for a missing folder is misleading)."""
    path = Path(model).expanduser()
    if model.startswith(("/", "./", "../", "~")) and not path.exists():
        return f"no such folder {str(path)!r}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
