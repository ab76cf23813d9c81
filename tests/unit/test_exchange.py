"""The exchange without HTTP: admission, cache, run, settlement, observation, disconnects and shutdown cuts.

A local plan runs on the scripted FakeEngine; a remote call on an upstream behind an ``httpx.MockTransport``. The
gateway is the real one over in-memory limits; the writer and the cache are small recording stand-ins.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import pytest

from persistence.models import Role
from persistence.records import RoleRecord
from schemas.native.generate import GenerateRequest
from schemas.openai.errors import ErrorResponse
from server.admission.gateway import Gateway
from server.admission.ratelimit import RateLimiter
from server.auth.principal import Principal
from server.engine.fake import FakeEngine
from server.errors import OpenAIError
from server.exchange.cache import decode_entry
from server.exchange.exchange import Exchange, Reply, cuttable
from server.exchange.remote import RemoteWork
from server.exchange.shutdown import InFlight, Lifecycle
from server.metrics import Metrics
from server.models.file import RemoteModel
from server.providers.upstream import Upstream
from server.records.record import RequestRecord
from server.serving import generate
from server.serving import remote as remote_serving
from server.serving.plan import CacheEntry

pytestmark = pytest.mark.anyio


class Writer:
    """Records what the exchange queues."""

    def __init__(self) -> None:
        self.rows: list[RequestRecord] = []
        self.cache: dict[str, bytes] = {}

    def add_row(self, record: RequestRecord) -> None:
        self.rows.append(record)

    def add_cache(self, key: str, key_id: str, model: str, blob: bytes, ttl_s: int) -> None:
        self.cache[key] = blob


class Cache:
    """Serves what the writer stored."""

    ttl_s = 60

    def __init__(self, writer: Writer) -> None:
        self.writer = writer

    async def get(self, key: str) -> CacheEntry | None:
        blob = self.writer.cache.get(key)
        return None if blob is None else decode_entry(blob)


class Harness:
    def __init__(self, *, cache: bool = False, quota_ok: bool = True, **limits: Any) -> None:
        self.settled: list[int] = []  # tokens each settled ticket used
        self.metrics = Metrics()
        self.writer = Writer()
        self.lifecycle = Lifecycle()

        async def reserve(*_: Any) -> bool:
            return quota_ok

        self.gateway = Gateway(RateLimiter("async+memory://"), reserve, lambda *_: None, self.metrics, fail_open=True)
        finish = self.gateway.finish

        async def recording_finish(ticket: Any, *, used_tokens: int, **kwargs: Any) -> None:
            self.settled.append(used_tokens)
            await finish(ticket, used_tokens=used_tokens, **kwargs)

        self.gateway.finish = recording_finish  # type: ignore[method-assign]
        self.exchange = Exchange(
            self.gateway,
            Cache(self.writer) if cache else None,  # type: ignore[arg-type]
            self.writer,  # type: ignore[arg-type]
            self.metrics,
            self.lifecycle,
            store_prompts=True,
        )
        role = RoleRecord.from_orm(Role(name="r", is_admin=False, **limits))
        self.caller = Principal(key_id="k1", key_name="k1", role=role)

    async def run(self, work: Any, disconnected: Callable[[], Any] | None = None) -> tuple[Reply, RequestRecord]:
        record = RequestRecord(request_id="req_1", route="/v1/generate", method="POST")
        reply = await self.exchange.run(work, self.caller, record, disconnected or never)
        return reply, record

    def count(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


async def never() -> None:
    await asyncio.Event().wait()


async def gone() -> None:
    await asyncio.sleep(0.05)


async def engine(**kwargs: Any) -> FakeEngine:
    e = FakeEngine(**kwargs)
    await e.start()
    return e


def plan(e: FakeEngine, prompt: str = "hello", *, stream: bool = False, **fields: Any) -> Any:
    return generate.prepare(e, GenerateRequest(prompt=prompt, **fields), stream=stream)


async def test_a_local_answer_settles_once_with_its_usage_and_fills_the_record() -> None:
    h, e = Harness(), await engine(script=["a", "b", "c"])
    reply, record = await h.run(plan(e, max_new_tokens=8))
    body = msgspec.to_builtins(reply.body)
    assert body["output"] == "abc"
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 4,
        "total_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert h.settled == [9]  # exactly once, with what was used (the end-of-sequence token included)
    assert (record.model, record.prompt_tokens, record.completion_tokens) == ("fake", 5, 4)
    assert record.finish_reason == "stop" and record.error_type is None and record.prompt_text == "hello"
    assert record.output_text == "abc" and not record.streaming and h.writer.rows == []  # the API queues this row
    assert h.lifecycle.in_flight == 0
    assert h.count("llm_server_request_success_total", model_name="fake", finished_reason="stop") == 1
    assert h.count("llm_server_generation_tokens_total", model_name="fake") == 4


async def test_a_deterministic_request_is_cached_then_replayed_without_the_engine_or_the_quota() -> None:
    h, e = Harness(cache=True), await engine(script=["x", "y"])
    first, _ = await h.run(plan(e, temperature=0, max_new_tokens=4))
    second, record = await h.run(plan(e, temperature=0, max_new_tokens=4))
    assert "x-cache" not in first.headers and second.headers["x-cache"] == "HIT"
    assert msgspec.to_builtins(second.body)["output"] == "xy" and len(e.requests) == 1
    assert h.settled == [8, 0]  # a hit counts as a request but spends no tokens
    assert record.cached and record.completion_tokens == 3
    assert h.count("llm_server_cache_hits_total", model_name="fake") == 1
    assert h.count("llm_server_cache_misses_total", model_name="fake") == 1


async def test_a_client_that_leaves_cancels_the_engine_rows_and_ends_as_499() -> None:
    h, e = Harness(), await engine(script=["t"] * 50, delay_s=0.05)
    with pytest.raises(OpenAIError) as left:
        await h.run(plan(e, max_new_tokens=50), gone)
    assert left.value.status == 499 and left.value.code == "client_closed_request"
    await asyncio.sleep(0)  # the abort task runs
    assert e.aborted and not e.completed
    assert len(h.settled) == 1 and h.lifecycle.in_flight == 0


async def test_a_cut_leaves_the_calling_task_uncancelled_and_a_late_disconnect_cuts_nothing() -> None:
    task = asyncio.current_task()
    assert task is not None
    handle = InFlight(task=task)
    never = asyncio.Event()

    async def forever() -> None:
        await never.wait()

    async def leaves_soon() -> None:
        await asyncio.sleep(0.01)

    with pytest.raises(OpenAIError) as left:  # the work is cancelled where it waits
        await cuttable(handle, forever(), leaves_soon)
    assert left.value.status == 499 and task.cancelling() == 0 and not handle.waiting
    await asyncio.sleep(0.02)  # nothing cancels the caller afterwards

    async def answer() -> str:
        await asyncio.sleep(0)
        return "done"

    async def instantly() -> None:
        return None

    # The client leaves as the work ends (the watcher's callback runs after it): the answer stands, and the
    # caller's later awaits are not cut.
    assert await cuttable(handle, answer(), instantly) == "done"
    await asyncio.sleep(0.01)
    assert task.cancelling() == 0


async def test_a_shutdown_whose_grace_ran_out_cuts_a_waiting_request_with_503() -> None:
    h, e = Harness(), await engine(script=["t"] * 50, delay_s=0.05)
    running = asyncio.create_task(h.run(plan(e, max_new_tokens=50)))
    await asyncio.sleep(0.02)
    h.lifecycle.expire()
    with pytest.raises(OpenAIError) as cut:
        await running
    assert cut.value.status == 503 and cut.value.code == "overloaded"
    assert len(h.settled) == 1 and h.lifecycle.in_flight == 0
    with pytest.raises(OpenAIError):  # nothing new is admitted once the grace period is over
        await h.run(plan(e))


async def test_a_stream_settles_when_it_ends_and_queues_its_own_row() -> None:
    h, e = Harness(), await engine(script=["a", "b"])
    reply, record = await h.run(plan(e, stream=True, max_new_tokens=4))
    assert reply.events is not None and reply.body is None and h.settled == []  # not before the stream ends
    texts = [msgspec.to_builtins(ev)["output"] async for ev in reply.events]
    assert "".join(texts) == "ab" and h.settled == [8]
    assert record.streaming and h.writer.rows == [record] and record.ttft_ms is not None
    assert reply.after is not None
    await reply.after()  # the response's end after a body that ran: nothing twice
    assert h.settled == [8] and h.lifecycle.in_flight == 0


async def test_a_stream_whose_body_never_ran_is_settled_by_the_response_end() -> None:
    h, e = Harness(), await engine(script=["a"] * 10, delay_s=0.05)
    reply, record = await h.run(plan(e, stream=True, max_new_tokens=10))
    assert reply.after is not None
    await reply.after()
    await asyncio.sleep(0)
    assert h.settled == [5] and e.aborted and record.error_type == "cancelled"
    assert h.lifecycle.in_flight == 0


async def test_an_engine_failure_mid_stream_is_an_error_frame_counted_in_the_metrics() -> None:
    h, e = Harness(), await engine(script=["a", "b", "c"], fail_after=1)
    reply, record = await h.run(plan(e, stream=True, max_new_tokens=5))
    assert reply.events is not None
    events = [ev async for ev in reply.events]
    assert isinstance(events[-1], ErrorResponse) and events[-1].error.type == "server_error"
    assert record.error_type == "server_error" and h.count("llm_server_errors_total", type="server_error") == 1
    assert h.lifecycle.in_flight == 0 and len(h.settled) == 1


async def test_a_full_engine_queue_refuses_with_503_and_charges_nothing() -> None:
    h, e = Harness(), await engine(script=["a"] * 10, delay_s=0.05, max_queue_size=1)
    held = plan(e, stream=True, max_new_tokens=10)
    reply, _ = await h.run(held)
    with pytest.raises(OpenAIError) as full:
        await h.run(plan(e, stream=True, max_new_tokens=10))
    assert full.value.status == 503 and h.settled == [0]
    assert reply.after is not None
    await reply.after()
    assert h.lifecycle.in_flight == 0


async def test_a_refused_admission_leaves_the_lifecycle() -> None:
    h, e = Harness(quota_ok=False, monthly_tokens=1000), await engine()
    with pytest.raises(OpenAIError) as refused:
        await h.run(plan(e))
    assert refused.value.status == 429 and h.lifecycle.in_flight == 0 and not e.requests


# -- a remote model through the same exchange ------------------------------------------------------------------
ENTRY = RemoteModel(
    name="remote", base_url="http://upstream.test/v1", upstream_model="up", max_concurrency=1, retries=0
)


def upstream(answer: Callable[[httpx.Request], httpx.Response]) -> Upstream:
    return Upstream(ENTRY, None, transport=httpx.MockTransport(answer))


def completion(usage: dict[str, int] | None) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        body: dict[str, Any] = {"choices": [{"index": 0, "text": "hi there", "finish_reason": "stop"}]}
        if usage is not None:
            body["usage"] = usage
        return httpx.Response(200, json=body)

    return answer


async def test_a_remote_answer_is_charged_the_upstreams_usage_and_gives_its_slot_back() -> None:
    h = Harness()
    up = upstream(completion({"prompt_tokens": 4, "completion_tokens": 2}))
    call = remote_serving.prepare_generate(GenerateRequest(prompt="hello"), ENTRY, stream=False, max_tokens_cap=None)
    reply, record = await h.run(RemoteWork(call, up))
    assert msgspec.to_builtins(reply.body)["output"] == "hi there" and "x-usage-estimated" not in reply.headers
    assert h.settled == [6] and up.running == 0
    assert (record.prompt_tokens, record.completion_tokens, record.usage_estimated) == (4, 2, False)
    assert h.count("llm_server_prompt_tokens_total", model_name="remote") == 4


async def test_a_remote_answer_without_usage_is_estimated_and_says_so() -> None:
    h = Harness()
    call = remote_serving.prepare_generate(GenerateRequest(prompt="hello"), ENTRY, stream=False, max_tokens_cap=None)
    reply, record = await h.run(RemoteWork(call, upstream(completion(None))))
    assert reply.headers["x-usage-estimated"] == "true" and record.usage_estimated
    assert h.settled == [call.usage.total_tokens] and h.settled[0] > 0


async def test_a_remote_stream_is_reframed_and_closes_the_upstream_request() -> None:
    h = Harness()

    def answer(request: httpx.Request) -> httpx.Response:
        chunks = [
            {"choices": [{"index": 0, "text": "hi", "finish_reason": None}]},
            {"choices": [{"index": 0, "text": "!", "finish_reason": "stop"}]},
            {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
        ]
        sse = b"".join(b"data: " + msgspec.json.encode(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
        return httpx.Response(200, content=sse, headers={"content-type": "text/event-stream"})

    up = upstream(answer)
    call = remote_serving.prepare_generate(GenerateRequest(prompt="hello"), ENTRY, stream=True, max_tokens_cap=None)
    reply, record = await h.run(RemoteWork(call, up))
    assert up.running == 1  # the stream holds its slot until it ends
    assert reply.events is not None
    texts = [msgspec.to_builtins(ev)["output"] async for ev in reply.events]
    assert "".join(texts) == "hi!" and h.settled == [5] and up.running == 0
    assert record.finish_reason == "stop" and h.writer.rows == [record]


async def test_an_upstream_that_is_down_fails_before_a_streams_headers() -> None:
    h = Harness()

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    up = upstream(down)
    call = remote_serving.prepare_generate(GenerateRequest(prompt="hello"), ENTRY, stream=True, max_tokens_cap=None)
    with pytest.raises(OpenAIError) as failed:
        await h.run(RemoteWork(call, up))
    assert failed.value.status == 502 and failed.value.code == "upstream_error"
    assert h.settled == [0] and up.running == 0 and h.lifecycle.in_flight == 0
