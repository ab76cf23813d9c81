"""Liveness, readiness and the Prometheus scrape."""

from __future__ import annotations

from litestar import Response, get
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from server.api.apidoc import ApiOperation
from server.engine.base import Engine
from server.metrics import Metrics
from server.services import Services


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
async def readyz(state: State) -> Response[dict[str, str]]:
    """200 once the model is loaded and the database answers; 503 with the reason otherwise."""
    engine: Engine = state.engine_ref
    failure = state.get("engine_failure")
    if failure:
        return Response({"status": "failed", "reason": f"model failed to load: {failure}"}, status_code=503)
    broken = broken_engine_reason(engine)
    if broken:
        return Response({"status": "failed", "reason": f"the engine failed: {broken}"}, status_code=503)
    if not engine.ready:
        return Response({"status": "loading", "reason": "the model is still loading"}, status_code=503)
    services: Services = state.services
    if not await services.db.ping():
        return Response({"status": "unavailable", "reason": "the database does not answer"}, status_code=503)
    return Response({"status": "ready", "model": engine.info.name}, status_code=200)


def broken_engine_reason(engine: Engine) -> str | None:
    """Why a started engine stopped serving for good, for engines that report it (an optional ``failure``)."""
    failure = getattr(engine, "failure", None)
    return str(failure) if failure else None


@get("/metrics", tags=["ops"], sync_to_thread=False, media_type=CONTENT_TYPE_PLAIN_0_0_4, operation_class=ApiOperation)
def metrics(metrics: NamedDependency[Metrics]) -> Response[bytes]:
    """Prometheus text exposition."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)
