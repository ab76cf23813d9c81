"""The app's lifespan, one part per resource: what each starts, and what it stops at shutdown.

Litestar enters ``lifespan=[...]`` in order and exits in reverse, so :data:`PARTS` lists them by dependency: the
rate-limit storage and the database first (everything else uses them), the request-log writer, the upstreams and
engines, and last the drain. At shutdown the drain therefore runs first: requests cut by the shutdown settle their
usage and request log before the engines, the upstreams, the writer and the database stop, in that order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from urllib.parse import urlsplit

from litestar import Litestar

from persistence import migrate
from server.engine.base import Instrumented
from server.engine.loading import load_failure_reason as engine_load_failure_reason
from server.exchange.shutdown import CANCEL_MARGIN_S
from server.wiring.datadir import prepare_data_dir
from server.wiring.models import ServedModels
from server.wiring.state import AppState, app_state

log = logging.getLogger("server")

Lifespan = Callable[[Litestar], AbstractAsyncContextManager[None]]


@asynccontextmanager
async def ratelimit_storage(app: Litestar) -> AsyncIterator[None]:
    """Nothing to open (the storage connects on first use); drop its connections (Redis) last of all."""
    state = app_state(app)
    try:
        yield
    finally:
        state.services.limiter.close()


@asynccontextmanager
async def database(app: Litestar) -> AsyncIterator[None]:
    """Create the data folder and migrate the database (``AUTO_MIGRATE``); close its pool at the end."""
    state = app_state(app)
    settings = state.settings
    prepare_data_dir(settings)  # 0700, before a built-in model is built in it
    if settings.auto_migrate:
        default_role = {
            "rpm": settings.default_role_rpm,
            "tpm": settings.default_role_tpm,
            "max_concurrency": settings.default_role_max_concurrency,
        }
        await migrate.upgrade(settings.database, default_role=default_role)
    try:
        yield
    finally:
        await state.services.db.close()


@asynccontextmanager
async def writer(app: Litestar) -> AsyncIterator[None]:
    """Run the request-log writer; at the end it writes what is still queued."""
    state = app_state(app)
    state.services.writer.start()
    try:
        yield
    finally:
        await state.services.writer.stop()


@asynccontextmanager
async def upstreams(app: Litestar) -> AsyncIterator[None]:
    """Watch every remote model's health in the background (and its load, as gauges); close their clients."""
    state = app_state(app)
    watchers: list[asyncio.Task[None]] = []
    for name, up in state.models.upstreams.items():
        state.metrics.watch_engine(name, _reader(up, "running"), _reader(up, "waiting"))
        watchers.append(asyncio.create_task(up.watch(), name=f"upstream-health-{name}"))
    try:
        yield
    finally:
        for task in watchers:
            task.cancel()
        for up in state.models.upstreams.values():
            await up.aclose()


@asynccontextmanager
async def engines(app: Litestar) -> AsyncIterator[None]:
    """Load the local models in the background (readiness says when they are ready); stop them at the end."""
    state = app_state(app)
    if state.settings.models_file is not None:
        log.info("serving %s", ", ".join(describe(state.models, name) for name in state.models.order))
    loader = asyncio.create_task(_load_engines(state))
    try:
        yield
    finally:
        loader.cancel()
        for engine in state.models.local.values():
            await engine.stop()


@asynccontextmanager
async def drain(app: Litestar) -> AsyncIterator[None]:
    """At shutdown, wait (a bounded time) for the requests still registered to end and settle their accounting, and
    for background responses to store their final state."""
    state = app_state(app)
    lifecycle = state.lifecycle
    try:
        yield
    finally:
        if not await lifecycle.wait_idle(CANCEL_MARGIN_S):
            log.warning("shutdown: %d request(s) still running; stopping the engine anyway", lifecycle.in_flight)
        if not await state.responses.wait_idle(CANCEL_MARGIN_S):
            log.warning("shutdown: background responses did not store their final state in time")


PARTS: list[Lifespan] = [ratelimit_storage, database, writer, upstreams, engines, drain]
"""The app's lifespan, in start order (Litestar stops them in reverse)."""


async def _load_engines(state: AppState) -> None:
    """Start each engine in turn; the first that fails is recorded, and the runner exits non-zero on it."""
    settings, models = state.settings, state.models
    for name, engine in models.local.items():
        source = settings.model if settings.models_file is None else name
        try:
            await engine.start()
            state.metrics.watch_engine(name, _reader(engine, "num_running"), _reader(engine, "num_waiting"))
            if isinstance(engine, Instrumented):
                state.metrics.kv.watch(name, engine.stats)
        except Exception as exc:  # readiness reports it; `llm-server serve` then exits non-zero
            revision = settings.revision if settings.models_file is None else None
            reason = load_failure_reason(source, exc, revision=revision)
            log.error("model %r failed to load: %s", source, reason)
            log.debug("model load failure", exc_info=exc)
            models.failures[name] = reason
            state.lifecycle.fail(f"model {source!r} failed to load: {reason}")
            return
    state.lifecycle.models_loaded()


def describe(models: ServedModels, name: str) -> str:
    """One served model for the start-up log: local, or the upstream it forwards to (no query string: some
    providers take keys there)."""
    up = models.upstreams.get(name)
    if up is None:
        return f"{name!r} (local)"
    url = urlsplit(up.entry.base_url)
    return f"{name!r} -> {url.scheme}://{url.netloc}{url.path} ({up.entry.target_model})"


def load_failure_reason(model: str, exc: BaseException, *, revision: str | None = None) -> str:
    """One line saying why ``model`` did not load (see :func:`server.engine.loading.load_failure_reason`)."""
    return engine_load_failure_reason(model, exc, revision=revision)


def _reader(obj: object, attr: str) -> Callable[[], float]:
    return lambda: float(getattr(obj, attr))
