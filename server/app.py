"""The application factory: ``create_app(settings, engine=...)`` wires everything explicitly (no globals).

The app is composed of named parts: its state (:class:`~server.wiring.state.AppState`, one typed object), its
lifespan (:data:`server.wiring.lifespans.PARTS`: database, writer, upstreams, engines, drain), the routes, one
middleware that observes each request (``server.api.access``) and a ``before_send`` hook that only sets headers.
"""

from __future__ import annotations

from typing import Any

import anyio
from litestar import Litestar, Request, Response, Router
from litestar.config.cors import CORSConfig
from litestar.datastructures import MutableScopeHeaders, State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components
from litestar.types import Message, Scope

from server import tracing
from server.api.access import count_response, timing_middleware
from server.api.admin import admin_handlers
from server.api.apidoc import KEY_SECURITY, SECURITY_SCHEMES, StructBoundsPlugin
from server.api.common import read_timeout_middleware, strict_body
from server.api.context import context_of, request_id_of
from server.api.docs import DOCS_HANDLERS
from server.api.embeddings import EMBEDDING_HANDLERS
from server.api.exceptions import handle_exception
from server.api.gate import PREPARE_THREADS, screen
from server.api.guards import guarded, require_key
from server.api.health import health, metrics, readyz
from server.api.models import list_models, retrieve_model
from server.api.native import generate_text, stream_text
from server.api.openai import create_chat_completion, create_completion
from server.api.responses import RESPONSES_HANDLERS
from server.engine.base import Embedder, Engine
from server.exchange.exchange import Exchange
from server.exchange.responses import Responses
from server.exchange.shutdown import Lifecycle, shutting_down
from server.metrics import Metrics
from server.records.responses import ResponseStore
from server.settings import Settings, load_settings
from server.wiring.lifespans import PARTS
from server.wiring.models import ServedModels, build_models
from server.wiring.services import Services, build_services
from server.wiring.state import AppState, app_state


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | Embedder | None = None,
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
    tracing.configure()
    if models is None:
        if engine is None:
            models = build_models(settings)
        else:
            models = ServedModels()
            models.add(settings.served_model_name or engine.name, engine, embeds=_embeds(engine))
    the_services = services or build_services(settings, Metrics())
    lifecycle = Lifecycle()
    exchange = Exchange(
        the_services.gateway,
        the_services.cache,
        the_services.writer,
        the_services.metrics,
        lifecycle,
        store_prompts=settings.store_prompts,
        prefix_cache_scope=settings.prefix_cache_scope,
    )
    state = AppState(
        settings=settings,
        services=the_services,
        models=models,
        lifecycle=lifecycle,
        exchange=exchange,
        prepare_limiter=anyio.CapacityLimiter(PREPARE_THREADS),
        responses=Responses(exchange, ResponseStore(the_services.db), max_history_bytes=settings.request_max_body_size),
    )

    v1 = Router(
        path="/",
        before_request=guarded(require_key, before_request),
        route_handlers=[
            list_models,
            retrieve_model,
            create_chat_completion,
            create_completion,
            generate_text,
            stream_text,
            *RESPONSES_HANDLERS,
            *EMBEDDING_HANDLERS,
        ],
        security=KEY_SECURITY,
    )
    cors = CORSConfig(allow_origins=settings.cors_origins) if settings.cors_origins else None
    return Litestar(
        route_handlers=[health, readyz, metrics, v1, *admin_handlers(before_request), *DOCS_HANDLERS],
        dependencies={
            "models": Provide(lambda: state.models, sync_to_thread=False),
            "metrics": Provide(lambda: state.metrics, sync_to_thread=False),
            "services": Provide(lambda: state.services, sync_to_thread=False),
        },
        exception_handlers={Exception: handle_exception},
        before_request=before_request,
        middleware=[
            timing_middleware(state.metrics, state.services.writer),
            read_timeout_middleware(settings.request_read_timeout_s),
        ],
        before_send=[response_headers, count_response(state.metrics)],
        lifespan=PARTS,
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
        state=State(state.as_state()),
    )


def _embeds(engine: Engine | Embedder) -> bool:
    """Whether ``engine`` is an embedding model, told by its class: ``isinstance`` against the protocol would read
    its properties, and an engine not yet started raises from them."""
    return callable(getattr(type(engine), "embed", None))


async def before_request(request: Request[Any, Any, Any]) -> Response[Any] | None:
    """Refuse new work while draining; screen the caller and the model, then decode the body once, strictly."""
    path = request.scope["path"]
    if app_state(request.app).lifecycle.draining and path not in ("/health", "/metrics"):
        if path == "/readyz":  # takes this replica out of a load balancer's rotation
            return Response({"status": "draining", "reason": "the server is shutting down"}, status_code=503)
        raise shutting_down()
    await screen(request)
    await strict_body(request)
    return None


async def response_headers(message: Message, scope: Scope) -> None:
    """``before_send`` hook: the request id on every response, the rate-limit headers on the caller's ``/v1`` ones."""
    if message["type"] != "http.response.start":
        return
    headers = MutableScopeHeaders.from_message(message)
    headers["x-request-id"] = request_id_of(scope)
    principal = context_of(scope).principal
    if principal is not None and scope["path"].startswith("/v1/") and "x-ratelimit-limit-requests" not in headers:
        for name, value in (await app_state(scope["app"]).services.gateway.headers(principal)).items():
            headers[name] = value
