"""``/docs`` and ``/openapi.json`` beside Litestar's ``/schema``, and the process metrics on ``/metrics``."""

from __future__ import annotations

import sys

from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families


def test_openapi_json_is_the_schema_document(client: TestClient[Litestar]) -> None:
    ours = client.get("/openapi.json")
    assert ours.status_code == 200
    assert ours.headers["content-type"].startswith("application/json")
    assert ours.json() == client.get("/schema/openapi.json").json()
    assert "/v1/chat/completions" in ours.json()["paths"]


def test_docs_is_swagger_ui_over_the_document(client: TestClient[Litestar]) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "SwaggerUIBundle" in page.text and '"/v1/chat/completions"' in page.text
    assert "SwaggerUIBundle" in client.get("/schema/swagger").text


def test_the_docs_routes_are_not_in_the_document(client: TestClient[Litestar]) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/docs" not in paths and "/openapi.json" not in paths


def test_process_metrics_are_scraped(client: TestClient[Litestar]) -> None:
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert families["python_info"].samples[0].labels["major"] == str(sys.version_info.major)
    if sys.platform.startswith("linux"):  # the process collector reads /proc
        assert families["process_resident_memory_bytes"].samples[0].value > 0
        assert families["process_open_fds"].samples[0].value > 0
        assert "process_cpu_seconds" in families
