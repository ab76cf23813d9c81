"""Liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

from litestar import Response, get
from litestar.datastructures import State
from litestar.di import NamedDependency
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from server.engine.base import Engine
from server.metrics import Metrics
from server.services import Services


@get("/health", tags=["ops"], sync_to_thread=False, include_in_schema=True)
def health() -> dict[str, str]:
    """200 while the process runs."""
    return {"status": "ok"}


@get("/readyz", tags=["ops"])
async def readyz(state: State) -> Response[dict[str, str]]:
    """200 once the model is loaded and the database answers; 503 with the reason otherwise."""
    engine: Engine = state.engine_ref
    failure = state.get("engine_failure")
    if failure:
        return Response({"status": "failed", "reason": f"model failed to load: {failure}"}, status_code=503)
    if not engine.ready:
        return Response({"status": "loading", "reason": "the model is still loading"}, status_code=503)
    services: Services = state.services
    if not await services.db.ping():
        return Response({"status": "unavailable", "reason": "the database does not answer"}, status_code=503)
    return Response({"status": "ready", "model": engine.info.name}, status_code=200)


@get("/metrics", tags=["ops"], sync_to_thread=False)
def metrics(metrics: NamedDependency[Metrics]) -> Response[bytes]:
    """Prometheus text exposition."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)
