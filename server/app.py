"""The application factory: ``create_app(settings, engine=...)`` wires everything explicitly (no globals)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
from server.api.context import context_of
from server.api.exceptions import handle_exception
from server.api.gate import screen
from server.api.guards import require_key
from server.api.health import health, metrics, readyz
from server.api.models import list_models, retrieve_model
from server.api.native import generate_text, stream_text
from server.api.openai import create_chat_completion, create_completion
from server.api.requestid import request_id_of
from server.engine.base import Engine
from server.exchange.exchange import Exchange
from server.exchange.shutdown import CANCEL_MARGIN_S, Lifecycle, shutting_down
from server.metrics import Metrics, status_class
from server.models.registry import ServedModels, build_models
from server.settings import Settings, load_settings
from server.wiring.datadir import prepare_data_dir
from server.wiring.services import Services, build_services

log = logging.getLogger("server")


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    services: Services | None = None,
    models: ServedModels | None = None,
) -> Litestar:
    """Build the ASGI app.

    Args:
        settings: Configuration; read from the environment when ``None``.
        engine: The one model runtime; when ``None`` the models come from ``models`` or ``settings`` (the models
            file, else ``MODEL``). Tests pass a ``FakeEngine``.
        services: The gateway (database, limits, auth, log); built from ``settings`` when ``None``.
        models: Every served model (local engines and remote upstreams), instead of ``engine``.
    """
    settings = settings or load_settings()
    if models is None:
        if engine is None:
            models = build_models(settings)
        else:
            models = ServedModels()
            models.add(settings.served_model_name or engine.name, engine)
    served: ServedModels = models
    app_metrics = services.metrics if services is not None else Metrics()
    the_services = services or build_services(settings, app_metrics)
    lifecycle = Lifecycle()
    exchange = Exchange(
        the_services.gateway,
        the_services.cache,
        the_services.writer,
        app_metrics,
        lifecycle,
        store_prompts=settings.store_prompts,
    )
    watchers: list[asyncio.Task[None]] = []

    async def load_engines(app: Litestar) -> None:
        for name, eng in served.engines.items():
            source = settings.model if settings.models_file is None else name
            try:
                await eng.start()
                app_metrics.watch_engine(name, _reader(eng, "num_running"), _reader(eng, "num_waiting"))
            except Exception as exc:  # readiness reports it; `llm-server serve` then exits non-zero
                reason = load_failure_reason(source, exc)
                log.error("model %r failed to load: %s", source, reason)
                log.debug("model load failure", exc_info=exc)
                served.failures[name] = reason
                lifecycle.fail(f"model {source!r} failed to load: {reason}")
                return

    def describe(name: str) -> str:
        up = served.upstreams.get(name)
        if up is None:
            return f"{name!r} (local)"
        url = urlsplit(up.entry.base_url)  # no query string: some providers take keys there
        return f"{name!r} -> {url.scheme}://{url.netloc}{url.path} ({up.entry.target_model})"

    def watch_upstreams() -> None:
        for name, up in served.upstreams.items():
            app_metrics.watch_engine(name, _reader(up, "running"), _reader(up, "waiting"))
            watchers.append(asyncio.create_task(up.watch(), name=f"upstream-health-{name}"))

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        prepare_data_dir(settings)  # 0700, before a built-in model is built in it
        if settings.auto_migrate:
            default_role = {
                "rpm": settings.default_role_rpm,
                "tpm": settings.default_role_tpm,
                "max_concurrency": settings.default_role_max_concurrency,
            }
            await migrate.upgrade(settings.database, default_role=default_role)
        the_services.writer.start()
        if settings.models_file is not None:
            log.info("serving %s", ", ".join(describe(name) for name in served.order))
        loader = asyncio.create_task(load_engines(app))
        watch_upstreams()
        try:
            yield
        finally:
            loader.cancel()
            for task in watchers:
                task.cancel()
            # Requests cut by a shutdown settle (usage, request log) before the engine and the writer stop.
            if not await lifecycle.wait_idle(CANCEL_MARGIN_S):
                log.warning("shutdown: %d request(s) still running; stopping the engine anyway", lifecycle.in_flight)
            for eng in served.engines.values():
                await eng.stop()
            for up in served.upstreams.values():
                await up.aclose()
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
        context = context_of(scope)
        principal = context.principal
        if principal is not None and scope["path"].startswith("/v1/") and "x-ratelimit-limit-requests" not in headers:
            for name, value in (await the_services.gateway.headers(principal)).items():
                headers[name] = value
        record = context.record
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
        await screen(request)
        await strict_body(request)
        return None

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
            "models": Provide(lambda: served, sync_to_thread=False),
            "metrics": Provide(lambda: app_metrics, sync_to_thread=False),
            "services": Provide(lambda: the_services, sync_to_thread=False),
            "exchange": Provide(lambda: exchange, sync_to_thread=False),
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
                "models": served,
                "engine_ref": next(iter(served.engines.values()), None),
                "metrics": app_metrics,
                "services": the_services,
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


def _reader(obj: object, attr: str) -> Callable[[], float]:
    return lambda: float(getattr(obj, attr))
