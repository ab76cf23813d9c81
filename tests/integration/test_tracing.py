"""OpenTelemetry tracing: off by default, on with the standard variables; spans checked with the in-memory exporter.

Run with ``-s`` to see the spans of one streamed chat request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from server import tracing
from server.app import create_app
from server.engine.fake import FakeEngine
from server.exchange.observe import FIRST_TOKEN_EVENT
from server.settings import Settings
from tests.fakes.embedders import FakeEmbedder
from tests.fakes.replies import CHAT_STREAM, sse
from tests.fakes.upstream import MSGS, MockUpstream, serving

PROMPT = "a secret prompt about zebras"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.use_provider(None)


def by_name(finished: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in finished}


def stream_chat(http: TestClient[Litestar], **headers: str) -> list[str]:
    body = {"model": "fake", "messages": [{"role": "user", "content": PROMPT}], "stream": True, "max_tokens": 8}
    body |= {"temperature": 0.5, "top_p": 0.9, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        return [line for line in response.iter_lines() if line.startswith("data: ")]


def show(finished: tuple[ReadableSpan, ...]) -> None:
    for s in sorted(finished, key=lambda s: s.start_time or 0):
        parent = f"{s.parent.span_id:016x}" if s.parent else None
        took = ((s.end_time or 0) - (s.start_time or 0)) / 1e6
        print(f"\nspan {s.name!r} kind={s.kind.name} id={s.context.span_id:016x} parent={parent} {took:.2f} ms")
        for key, value in (s.attributes or {}).items():
            print(f"  {key} = {value!r}")
        for event in s.events:
            print(f"  event {event.name} +{(event.timestamp - (s.start_time or 0)) / 1e6:.2f} ms")


def test_a_streamed_chat_request_is_one_span_with_genai_attributes_and_child_spans(
    spans: InMemorySpanExporter, make_app: Callable[..., Litestar], authed: Callable[[Any], Any]
) -> None:
    engine = FakeEngine(["Hel", "lo", " wor", "ld"], served_model_name="fake")
    with authed(TestClient(make_app(engine))) as http:
        frames = stream_chat(http)
        assert frames[-1] == "data: [DONE]"
    finished = spans.get_finished_spans()
    show(finished)
    named = by_name(finished)
    assert set(named) == {"POST /v1/chat/completions", "admission", "queue", "generation"}
    request = named["POST /v1/chat/completions"]
    attributes = dict(request.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"] == "fake"
    assert attributes["gen_ai.request.max_tokens"] == 8
    assert attributes["gen_ai.request.temperature"] == 0.5
    assert attributes["gen_ai.request.top_p"] == 0.9
    usage = json.loads(frames[-2].removeprefix("data: "))["usage"]
    assert attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    first_chunk = json.loads(frames[0].removeprefix("data: "))
    assert attributes["gen_ai.response.id"] == first_chunk["id"]
    assert attributes["http.route"] == "/v1/chat/completions"
    assert attributes["http.response.status_code"] == 200
    assert [e.name for e in request.events] == [FIRST_TOKEN_EVENT]
    assert request.parent is None
    for child in ("admission", "queue", "generation"):
        span = named[child]
        assert span.parent is not None and span.parent.span_id == request.context.span_id
        assert span.context.trace_id == request.context.trace_id
        assert request.start_time is not None and span.start_time is not None and span.end_time is not None
        assert request.end_time is not None and request.start_time <= span.start_time <= span.end_time
    generation = named["generation"]
    assert generation.end_time is not None and request.end_time is not None
    assert generation.end_time <= request.end_time  # the request span ends after the stream, not at its headers
    assert request.events[0].timestamp >= generation.start_time  # type: ignore[operator]


def test_no_prompt_output_or_key_in_any_attribute(
    spans: InMemorySpanExporter, make_app: Callable[..., Litestar], authed: Callable[[Any], Any], api_key: str
) -> None:
    with authed(TestClient(make_app(FakeEngine(["zebra", "s"], served_model_name="fake")))) as http:
        stream_chat(http)
    finished = spans.get_finished_spans()
    assert finished
    texts = [str(v) for s in finished for v in (s.attributes or {}).values()]
    texts += [str(v) for s in finished for e in s.events for v in (e.attributes or {}).values()]
    assert not [t for t in texts if "zebra" in t or api_key in t or api_key[:12] in t]


def test_a_traceparent_makes_the_request_span_its_child(
    spans: InMemorySpanExporter, make_app: Callable[..., Litestar], authed: Callable[[Any], Any]
) -> None:
    with authed(TestClient(make_app(FakeEngine(["ok"], served_model_name="fake")))) as http:
        stream_chat(http, traceparent=TRACEPARENT, tracestate="vendor=1")
    request = by_name(spans.get_finished_spans())["POST /v1/chat/completions"]
    assert f"{request.context.trace_id:032x}" == TRACE_ID
    assert request.parent is not None and f"{request.parent.span_id:016x}" == PARENT_ID
    assert request.parent.is_remote
    assert request.context.trace_state.get("vendor") == "1"


def test_the_trace_is_propagated_to_a_remote_upstream(
    spans: InMemorySpanExporter, settings: Settings, api_key: str
) -> None:
    mock = MockUpstream(lambda request, body: sse(*CHAT_STREAM))
    with serving(settings, mock, api_key) as (http, _):
        body = {"model": "remote", "messages": MSGS, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT}) as r:
            assert r.status_code == 200
            r.read()
    request = by_name(spans.get_finished_spans())["POST /v1/chat/completions"]
    sent = mock.posts[0].headers["traceparent"]
    version, trace_id, span_id, flags = sent.split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert span_id == f"{request.context.span_id:016x}"  # the request span is the upstream call's parent


def test_an_upstream_gets_no_traceparent_while_tracing_is_off(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(lambda request, body: sse(*CHAT_STREAM))
    with serving(settings, mock, api_key) as (http, _):
        body = {"model": "remote", "messages": MSGS, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body, headers={"traceparent": TRACEPARENT}) as r:
            r.read()
    assert "traceparent" not in mock.posts[0].headers


def test_other_routes_have_no_span(
    spans: InMemorySpanExporter, make_app: Callable[..., Litestar], authed: Callable[[Any], Any]
) -> None:
    with authed(TestClient(make_app(FakeEngine(["ok"], served_model_name="fake")))) as http:
        assert http.get("/v1/models").status_code == 200
        assert http.get("/health").status_code == 200
    assert spans.get_finished_spans() == ()


def test_tracing_is_off_without_the_standard_variables(
    make_app: Callable[..., Litestar], authed: Callable[[Any], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    with authed(TestClient(make_app(FakeEngine(["ok"], served_model_name="fake")))) as http:
        stream_chat(http)
    assert tracing.TRACER is None


OFF_PROBE = """
import sys
from server import tracing
from server.app import create_app
from server.settings import load_settings

settings = load_settings(environ={"LLM_SERVER_MODEL": "builtin:echo", "LLM_SERVER_DATA_DIR": sys.argv[1]}, dotenv=None)
create_app(settings)
print(tracing.TRACER is not None, any(m.startswith("opentelemetry.sdk") for m in sys.modules))
"""


@pytest.mark.parametrize(
    ("otel", "printed"),
    [({}, "False False"), ({"OTEL_TRACES_EXPORTER": "console"}, "True True")],
)
def test_off_by_default_no_provider_and_not_even_the_sdk_is_loaded(
    tmp_path: Any, otel: dict[str, str], printed: str
) -> None:
    """A fresh process building the app: without the OTEL_* variables no tracer exists and the SDK (provider,
    processors, exporters) is never imported; the same probe with an exporter asked for sees both."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | otel
    out = subprocess.run(
        [sys.executable, "-c", OFF_PROBE, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == printed


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, []),
    ],
)
def test_which_variables_turn_tracing_on(env: dict[str, str], exporters: list[str]) -> None:
    assert tracing.wanted(env) == exporters


def test_an_endpoint_turns_tracing_on_with_an_otlp_exporter_and_the_service_name() -> None:
    assert not tracing.configure({})
    assert tracing.TRACER is None
    try:
        assert tracing.configure({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
        assert tracing.TRACER is not None
        provider = tracing._PROVIDER
        assert provider is not None
        assert provider.resource.attributes["service.name"] == "llm-server"
    finally:
        tracing.use_provider(None)
    assert tracing.TRACER is None


def test_an_embeddings_request_is_an_embeddings_span(
    spans: InMemorySpanExporter, settings: Settings, authed: Callable[[Any], Any]
) -> None:
    with authed(TestClient(create_app(settings, engine=FakeEmbedder()))) as http:
        response = http.post("/v1/embeddings", json={"model": "fake-embed", "input": ["one", "two"]})
        assert response.status_code == 200, response.text
    named = by_name(spans.get_finished_spans())
    request = named["POST /v1/embeddings"]
    attributes = dict(request.attributes or {})
    assert attributes["gen_ai.operation.name"] == "embeddings"
    assert attributes["gen_ai.usage.input_tokens"] == response.json()["usage"]["prompt_tokens"]
    assert "admission" in named


def test_a_non_streamed_completion_is_a_text_completion_span(
    spans: InMemorySpanExporter, make_app: Callable[..., Litestar], authed: Callable[[Any], Any]
) -> None:
    with authed(TestClient(make_app(FakeEngine(["a", "b"], served_model_name="fake")))) as http:
        body = http.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2}).json()
    request = by_name(spans.get_finished_spans())["POST /v1/completions"]
    attributes = dict(request.attributes or {})
    assert attributes["gen_ai.operation.name"] == "text_completion"
    assert attributes["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]
    assert attributes["gen_ai.response.finish_reasons"] == (body["choices"][0]["finish_reason"],)


def test_a_stream_that_ends_with_an_error_frame_is_a_failed_span(
    spans: InMemorySpanExporter, make_app: Callable[..., Litestar], authed: Callable[[Any], Any]
) -> None:
    with authed(TestClient(make_app(script=["a", "b", "c"], fail_after=2, served_model_name="fake"))) as http:
        frames = stream_chat(http)
        assert "error" in json.loads(frames[-1].removeprefix("data: "))
    request = by_name(spans.get_finished_spans())["POST /v1/chat/completions"]
    assert request.status.status_code is StatusCode.ERROR
    assert (request.attributes or {})["error.type"] == "server_error"
    assert (request.attributes or {})["http.response.status_code"] == 200


def test_an_error_answer_names_its_code_in_error_type(
    spans: InMemorySpanExporter, make_app: Callable[..., Litestar], authed: Callable[[Any], Any]
) -> None:
    """The code the client got, not how the exchange saw the work end (a failed generation is ``cancelled`` there)."""
    with authed(TestClient(make_app(script=["a", "b", "c"], fail_after=1, served_model_name="fake"))) as http:
        body = {"model": "fake", "messages": [{"role": "user", "content": PROMPT}]}
        failed = http.post("/v1/chat/completions", json=body)
        assert failed.status_code == 500
        too_long = http.post("/v1/chat/completions", json=body | {"max_tokens": 10**6})
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
    first, second = sorted(
        (s for s in spans.get_finished_spans() if s.name == "POST /v1/chat/completions"),
        key=lambda s: s.start_time or 0,
    )
    assert (first.attributes or {})["error.type"] == "server_error"
    assert (first.attributes or {})["http.response.status_code"] == 500
    assert first.status.status_code is StatusCode.ERROR
    assert (second.attributes or {})["error.type"] == "context_length_exceeded"
    assert (second.attributes or {})["http.response.status_code"] == 400
    assert second.status.status_code is StatusCode.UNSET  # a client's mistake is no server error


def test_span_times_follow_a_stepped_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A perf_counter reading converts with the clocks' offset at that moment, so an NTP step mid-run moves the
    gateway's child spans with the SDK's own ``time_ns()`` timestamps instead of leaving them seconds apart."""
    import time

    real = time.time_ns
    start = time.perf_counter()
    before = tracing.epoch_ns(start)
    monkeypatch.setattr(time, "time_ns", lambda: real() + 1_400_000_000)
    after = tracing.epoch_ns(start)
    assert 1_390_000_000 <= after - before <= 1_410_000_000
    assert abs(time.time_ns() - tracing.epoch_ns(time.perf_counter())) < 50_000_000
