"""Liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from server.api.apidoc import ApiOperation
from server.metrics import Metrics
from server.wiring.state import app_state


@get("/health", tags=["ops"], sync_to_thread=False, operation_class=ApiOperation)
def health() -> dict[str, str]:
    """200 while the process runs."""
    return {"status": "ok"}


@get(
    "/readyz",
    tags=["ops"],
    responses={
        503: ResponseSpec(
            data_container=dict[str, str],
            description="Not ready: `status` is `loading`, `failed` or `unavailable`, `reason` says why (a probe "
            "body, not the error envelope).",
            generate_examples=False,
        )
    },
    operation_class=ApiOperation,
)
async def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """200 once every local model is loaded and the database answers; 503 with the reason otherwise.

    Remote models never make this 503: their upstreams' health (checked in the background) is in the body, so
    one dead upstream does not take the gateway out of a load balancer.
    """
    state = app_state(request.app)
    models = state.models
    for name, engine in models.local.items():
        which = f"model {name!r}" if len(models.local) > 1 else "model"
        failure = models.failures.get(name)
        if failure:
            return Response({"status": "failed", "reason": f"{which} failed to load: {failure}"}, status_code=503)
        broken = engine.failure
        if broken:
            engine_name = f"the engine of {name!r}" if len(models.local) > 1 else "the engine"
            return Response({"status": "failed", "reason": f"{engine_name} failed: {broken}"}, status_code=503)
        if not engine.ready:
            return Response({"status": "loading", "reason": f"the {which} is still loading"}, status_code=503)
    if not await state.services.db.ping():
        return Response({"status": "unavailable", "reason": "the database does not answer"}, status_code=503)
    body: dict[str, Any] = {"status": "ready", "model": models.default}
    if len(models.order) > 1 or models.upstreams:
        body["models"] = list(models.order)
    if models.upstreams:
        body["upstreams"] = {name: up.health.as_dict() for name, up in models.upstreams.items()}
    return Response(body, status_code=200)


@get("/metrics", tags=["ops"], sync_to_thread=False, media_type=CONTENT_TYPE_PLAIN_0_0_4, operation_class=ApiOperation)
def metrics(metrics: NamedDependency[Metrics]) -> Response[bytes]:
    """Prometheus text exposition."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)
