"""Stored responses through the SDK: retrieve, delete, input items pages, the key that owns them, conversations
continued with ``previous_response_id``, background runs and cancel, and the gateway (limits, quotas, request log,
metrics) on ``/v1/responses``."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from persistence import migrate
from server.app import create_app
from server.engine.fake import FakeEngine
from server.records.database import DatabaseUnavailable
from server.settings import Settings
from server.wiring.state import app_state
from tests.checks import log_rows
from tests.conftest import DB_NAME, TEST_PEPPER, add_role_key, bearer, role_key, sdk
from tests.fakes.templates import PLAIN, TemplateTokenizer, templated_engine
from tests.integration.test_shutdown import LoopSpy
from tests.live import live_server

SCRIPT = ["Hel", "lo", ",", " wor", "ld", "!"]
TEXT = "Hello, world!"


@pytest.fixture
def engine() -> FakeEngine:
    return templated_engine(PLAIN, SCRIPT)


@pytest.fixture
def http(settings: Settings, engine: FakeEngine, authed: Callable[[Any], Any]) -> Iterator[TestClient[Litestar]]:
    with authed(TestClient(create_app(settings, engine=engine))) as client:
        yield client


@pytest.fixture
def client(http: TestClient[Litestar], api_key: str) -> openai.OpenAI:
    return sdk(http, api_key)


def rendered(engine: FakeEngine) -> list[str]:
    tokenizer = engine.tokenizer
    assert isinstance(tokenizer, TemplateTokenizer)
    return tokenizer.rendered


def wait_for(client: openai.OpenAI, response_id: str, statuses: tuple[str, ...], timeout_s: float = 10) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.responses.retrieve(response_id)
        if response.status in statuses or time.monotonic() > deadline:
            return response
        time.sleep(0.02)


# ---- retrieve and delete ----------------------------------------------------------------------------------------


def test_retrieve_and_delete(client: openai.OpenAI) -> None:
    out = client.responses.create(model="fake", input="hi", metadata={"topic": "greeting"}, user="u-1")
    got = client.responses.retrieve(out.id)
    assert got.model_dump() == out.model_dump()
    assert got.metadata == {"topic": "greeting"} and got.user == "u-1"
    with pytest.raises(openai.BadRequestError) as err:  # a stored response is not streamed again
        client.responses.retrieve(out.id, stream=True)
    assert err.value.param == "stream"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.input_items.list(out.id, include=["message.output_text.logprobs"])
    assert err.value.param == "include"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.retrieve(out.id, include=["message.output_text.logprobs"])
    assert err.value.param == "include"
    client.responses.delete(out.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(out.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(out.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(out.id)


# ---- input items ------------------------------------------------------------------------------------------------


def test_input_items_pages(client: openai.OpenAI, http: TestClient[Litestar]) -> None:
    first = client.responses.create(
        model="fake",
        input=[
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "two"},
        ],
    )
    second = client.responses.create(model="fake", input="three", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # The conversation: the first turn's input and output, then this input (earliest first with order=asc).
    everything = list(client.responses.input_items.list(second.id, order="asc", limit=2))  # pages through `after`
    texts = [(item.role, item.content[0].text) for item in everything]  # type: ignore[union-attr]
    assert texts == [
        ("developer", "Answer briefly."),
        ("user", "one"),
        ("assistant", "ok"),
        ("user", "two"),
        ("assistant", TEXT),
        ("user", "three"),
    ]
    assert everything[4].id == first.output[0].id
    ids = [item.id for item in everything]
    assert len(set(ids)) == 6

    url = f"/v1/responses/{second.id}/input_items"
    page = http.get(url, params={"limit": 4, "order": "asc"}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [i["id"] for i in page["data"]] == ids[:4]
    assert (page["first_id"], page["last_id"]) == (ids[0], ids[3])
    rest = http.get(url, params={"limit": 4, "order": "asc", "after": page["last_id"]}).json()
    assert [i["id"] for i in rest["data"]] == ids[4:] and rest["has_more"] is False
    newest = http.get(url, params={"limit": 2}).json()  # desc by default: newest first
    assert [i["id"] for i in newest["data"]] == ids[::-1][:2] and newest["has_more"] is True
    assert client.responses.input_items.list(second.id, limit=1).data[0].id == ids[-1]
    assert [i.id for i in client.responses.input_items.list(first.id, order="asc").data] == ids[:4]
    bad = http.get(url, params={"after": "msg_unknown"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"


# ---- previous_response_id ---------------------------------------------------------------------------------------


def test_previous_turns_are_prompted_but_not_their_instructions(
    client: openai.OpenAI, engine: FakeEngine, settings: Settings
) -> None:
    first = client.responses.create(model="fake", input="What is up?", instructions="Speak like a pirate.")
    second = client.responses.create(model="fake", input="And now?", previous_response_id=first.id)
    prompts = rendered(engine)
    assert "Speak like a pirate." in prompts[0]
    assert "Speak like a pirate." not in prompts[-1]
    assert "<|im_start|>user\nWhat is up?<|im_end|>" in prompts[-1]
    assert f"<|im_start|>assistant\n{TEXT}<|im_end|>" in prompts[-1]
    assert prompts[-1].endswith("<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n")
    assert second.instructions is None
    # The rebuilt conversation is what the turn is charged for: the chat of the same messages costs the same.
    conversation: Any = [
        {"role": "user", "content": "What is up?"},
        {"role": "assistant", "content": TEXT},
        {"role": "user", "content": "And now?"},
    ]
    usage = client.chat.completions.create(model="fake", messages=conversation).usage
    assert second.usage is not None and usage is not None
    assert (second.usage.input_tokens, second.usage.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    third = client.responses.create(
        model="fake", input="Last.", previous_response_id=second.id, instructions="Speak plainly."
    )
    assert "Speak plainly." in rendered(engine)[-1] and "pirate" not in rendered(engine)[-1]
    assert third.instructions == "Speak plainly."


def test_another_key_sees_nothing(client: openai.OpenAI, http: TestClient[Litestar], settings: Settings) -> None:
    mine = client.responses.create(model="fake", input="hi")
    theirs = sdk(http, role_key(settings, "other"))
    calls: list[Callable[[], Any]] = [
        lambda: theirs.responses.retrieve(mine.id),
        lambda: theirs.responses.delete(mine.id),
        lambda: theirs.responses.input_items.list(mine.id),
        lambda: theirs.responses.cancel(mine.id),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.code == "not_found" and mine.id in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        theirs.responses.create(model="fake", input="hi", previous_response_id=mine.id)
    assert err.value.param == "previous_response_id"
    assert client.responses.retrieve(mine.id).output_text == TEXT  # still there for its owner


def test_a_rotated_keys_successor_sees_nothing_and_a_revoked_keys_turn_still_ends(
    settings: Settings, authed: Callable[[Any], Any]
) -> None:
    slow = FakeEngine(["x"] * 40, delay_s=0.02)
    with authed(TestClient(create_app(settings, engine=slow))) as admin:
        old = admin.post("/admin/keys", json={"name": "rotated"}).json()
        mine = sdk(admin, old["key"]).responses.create(model="fake", input="hi")
        new = admin.post(f"/admin/keys/{old['id']}/rotate", json={"grace_hours": 1}).json()
        assert sdk(admin, old["key"]).responses.retrieve(mine.id).id == mine.id  # within its grace: still its own
        successor = sdk(admin, new["key"])
        with pytest.raises(openai.NotFoundError):  # responses belong to the key id that made them
            successor.responses.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError) as err:
            successor.responses.create(model="fake", input="more", previous_response_id=mine.id)
        assert err.value.param == "previous_response_id"

        doomed = admin.post("/admin/keys", json={"name": "revoked"}).json()
        running = sdk(admin, doomed["key"]).responses.create(model="fake", input="hi", background=True)
        assert admin.post(f"/admin/keys/{doomed['id']}/revoke").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            sdk(admin, doomed["key"]).responses.retrieve(running.id)
        deadline = time.monotonic() + 10
        while status_of(settings, running.id) in ("queued", "in_progress"):  # admitted: it runs to its end
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status_of(settings, running.id) == "completed"


def status_of(settings: Settings, response_id: str) -> str:
    with sqlite3.connect(settings.data_dir / DB_NAME) as db:
        (status,) = db.execute("SELECT status FROM responses WHERE id = ?", (response_id,)).fetchone()
    return str(status)


def test_deterministic_turns_are_served_from_the_cache(client: openai.OpenAI, engine: FakeEngine) -> None:
    first = client.responses.create(model="fake", input="hi", temperature=0)
    again = client.responses.create(model="fake", input="hi", temperature=0)
    streamed = list(client.responses.create(model="fake", input="hi", temperature=0, stream=True))
    assert len(engine.requests) == 1  # the model ran once
    assert again.id != first.id and again.output[0].id != first.output[0].id  # a new response all the same
    assert again.output_text == streamed[-1].response.output_text == TEXT  # type: ignore[union-attr]
    assert first.usage is not None and again.usage is not None
    assert first.usage.input_tokens_details.cached_tokens == 0
    # A replayed answer computed nothing: its whole input counts as cached; the counts are the same.
    assert again.usage.input_tokens_details.cached_tokens == again.usage.input_tokens
    assert again.usage.model_dump(exclude={"input_tokens_details"}) == first.usage.model_dump(
        exclude={"input_tokens_details"}
    )
    # Two stored turns with the same conversation continue to the same prompt: the second continuation is cached.
    client.responses.create(model="fake", input="more", temperature=0, previous_response_id=first.id)
    client.responses.create(model="fake", input="more", temperature=0, previous_response_id=again.id)
    assert len(engine.requests) == 2


# ---- background -------------------------------------------------------------------------------------------------


def test_background_is_queued_then_completed(client: openai.OpenAI) -> None:
    out = client.responses.create(model="fake", input="hi", background=True)
    assert out.status == "queued" and out.background is True and out.output == []
    done = wait_for(client, out.id, ("completed",))
    assert done.status == "completed" and done.output_text == TEXT and done.usage is not None
    assert done.usage.output_tokens == len(SCRIPT) + 1
    with pytest.raises(openai.BadRequestError):  # it has ended: nothing to cancel
        client.responses.cancel(out.id)
    nxt = client.responses.create(model="fake", input="more", previous_response_id=out.id)
    assert nxt.status == "completed"


def test_cancel_a_running_background_response(settings: Settings, authed: Callable[[Any], Any], api_key: str) -> None:
    slow = FakeEngine(["x"] * 400, delay_s=0.02)
    with authed(TestClient(create_app(settings, engine=slow))) as http:
        client = sdk(http, api_key)
        out = client.responses.create(model="fake", input="hi", background=True)
        assert wait_for(client, out.id, ("in_progress",)).status in ("queued", "in_progress")
        time.sleep(0.2)
        cancelled = client.responses.cancel(out.id)
        assert cancelled.status == "cancelled"
        assert client.responses.retrieve(out.id).status == "cancelled"
        assert client.responses.cancel(out.id).status == "cancelled"  # cancelling again answers the same
        assert slow.aborted  # the engine stopped generating
        doomed = client.responses.create(model="fake", input="hi", background=True)
        assert wait_for(client, doomed.id, ("in_progress",)).status == "in_progress"
        client.responses.delete(doomed.id)  # deleting a running turn stops it too
        deadline = time.monotonic() + 5
        while len(slow.aborted) < 2:
            assert time.monotonic() < deadline, "the deleted turn kept running"
            time.sleep(0.02)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(doomed.id)
        plain = client.responses.create(model="fake", input="hi", max_output_tokens=2)
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.cancel(plain.id)
        assert "background" in err.value.message


# ---- the gateway ------------------------------------------------------------------------------------------------


def test_rpm_limit_with_headers(http: TestClient[Litestar], settings: Settings) -> None:
    client = sdk(http, role_key(settings, "rpm2", rpm=2, tpm=10_000))
    first = client.responses.with_raw_response.create(model="fake", input="hi")
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.parse().output_text == TEXT
    client.responses.create(model="fake", input="hi", background=True)
    with pytest.raises(openai.RateLimitError) as err:
        client.responses.create(model="fake", input="hi")
    assert err.value.code == "rate_limit_exceeded"
    assert err.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(err.value.response.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError):  # a refused background turn leaves nothing behind
        client.responses.create(model="fake", input="hi", background=True)


def test_reading_stored_responses_counts_against_the_requests_window(
    http: TestClient[Litestar], settings: Settings
) -> None:
    client = sdk(http, role_key(settings, "rpm4", rpm=4))
    made = client.responses.create(model="fake", input="hi")
    client.responses.retrieve(made.id)
    listed = client.responses.input_items.with_raw_response.list(made.id)
    assert listed.headers["x-ratelimit-remaining-requests"] == "1"
    client.responses.delete(made.id)
    # The window is full: reads, deletions and cancellations are refused like a new turn (nothing is read).
    for call in (
        lambda: client.responses.retrieve(made.id),
        lambda: client.responses.input_items.list(made.id),
        lambda: client.responses.delete(made.id),
        lambda: client.responses.cancel(made.id),
    ):
        with pytest.raises(openai.RateLimitError) as err:
            call()
        assert err.value.code == "rate_limit_exceeded"
        assert int(err.value.response.headers["retry-after"]) >= 1


def test_role_model_allowlist_and_token_cap(http: TestClient[Litestar], settings: Settings) -> None:
    elsewhere = sdk(http, role_key(settings, "elsewhere", allowed_models=["other"]))
    with pytest.raises(openai.PermissionDeniedError):
        elsewhere.responses.create(model="fake", input="hi")
    capped = sdk(http, role_key(settings, "capped", max_tokens=5))
    with pytest.raises(openai.BadRequestError) as err:
        capped.responses.create(model="fake", input="hi", max_output_tokens=6)
    assert err.value.param == "max_output_tokens" and "5" in err.value.message
    out = capped.responses.create(model="fake", input="hi")  # no max_output_tokens: the cap applies
    assert out.status == "incomplete" and out.usage is not None and out.usage.output_tokens == 5


def test_token_quota_counts_the_rebuilt_conversation(http: TestClient[Litestar], settings: Settings) -> None:
    client = sdk(http, role_key(settings, "metered", monthly_tokens=600))
    long = client.responses.create(model="fake", input="x" * 300, max_output_tokens=8)
    assert long.usage is not None and 300 < long.usage.total_tokens < 400
    with pytest.raises(openai.RateLimitError) as err:  # ~360 earlier tokens + 8 do not fit the ~240 left
        client.responses.create(model="fake", input="hi", max_output_tokens=8, previous_response_id=long.id)
    assert err.value.code == "insufficient_quota"
    alone = client.responses.create(model="fake", input="hi", max_output_tokens=8)  # the same input, alone, fits
    assert alone.status == "completed"


def test_tpm_and_monthly_requests_on_the_route(http: TestClient[Litestar], settings: Settings) -> None:
    tokens = sdk(http, role_key(settings, "tpm150", tpm=150))
    tokens.responses.create(model="fake", input="hi", max_output_tokens=50)
    with pytest.raises(openai.RateLimitError) as err:
        tokens.responses.create(model="fake", input="hi", max_output_tokens=50)
    assert err.value.type == "tokens" and err.value.code == "rate_limit_exceeded"
    assert int(err.value.response.headers["retry-after"]) >= 1
    counted = sdk(http, role_key(settings, "two-responses", monthly_requests=2))
    counted.responses.create(model="fake", input="hi")
    queued = counted.responses.create(model="fake", input="hi", background=True)
    assert wait_for(counted, queued.id, ("completed",)).status == "completed"
    with pytest.raises(openai.RateLimitError) as err:
        counted.responses.create(model="fake", input="hi", background=True)
    assert err.value.code == "insufficient_quota"


def stored_rows(settings: Settings) -> int:
    with sqlite3.connect(settings.data_dir / DB_NAME) as db:
        (count,) = db.execute("SELECT count(*) FROM responses").fetchone()
    return int(count)


def test_background_turns_of_a_key_are_bounded_by_its_concurrency_and_sequences(
    settings: Settings, authed: Callable[[Any], Any], api_key: str
) -> None:
    slow = FakeEngine(["x"] * 400, delay_s=0.02)
    bounded = msgspec.structs.replace(settings, max_sequences_per_key=3)
    app = create_app(bounded, engine=slow)
    writes: list[str] = []
    store = app_state(app).responses.store
    for name in ("create", "delete"):
        method = getattr(store, name)

        async def counted(*args: Any, _name: str = name, _method: Any = method, **kwargs: Any) -> Any:
            writes.append(_name)
            return await _method(*args, **kwargs)

        setattr(store, name, counted)
    with authed(TestClient(app)) as http:
        pair = sdk(http, role_key(settings, "two-at-a-time", max_concurrency=2))
        running = [pair.responses.create(model="fake", input="hi", background=True) for _ in range(2)]
        assert writes == ["create", "create"]
        for _ in range(3):
            with pytest.raises(openai.RateLimitError) as err:  # each running background turn holds its slot
                pair.responses.create(model="fake", input="hi", background=True)
            assert err.value.type == "requests" and err.value.code == "rate_limit_exceeded"
        assert writes == ["create", "create"]  # a refusal costs the database nothing
        assert stored_rows(settings) == 2
        assert pair.responses.cancel(running[0].id).status == "cancelled"  # its slot is free again
        running.append(pair.responses.create(model="fake", input="hi", background=True))
        assert running[-1].status == "queued"

        # A role without a concurrency bound: the server's bound of sequences in flight per key.
        unbounded = sdk(http, api_key)
        mine = [unbounded.responses.create(model="fake", input="hi", background=True) for _ in range(3)]
        with pytest.raises(openai.RateLimitError) as err:
            unbounded.responses.create(model="fake", input="hi", background=True)
        assert err.value.type == "requests"
        assert stored_rows(settings) == 2 + 1 + 3
        for client, out in [*((pair, r) for r in running[1:]), *((unbounded, r) for r in mine)]:
            assert client.responses.cancel(out.id).status == "cancelled"


def test_a_background_turn_whose_row_cannot_be_stored_is_stopped_and_refused(
    settings: Settings, authed: Callable[[Any], Any]
) -> None:
    slow = FakeEngine(["x"] * 400, delay_s=0.02)
    app = create_app(settings, engine=slow)
    store = app_state(app).responses.store
    create = store.create

    async def unavailable(**_: Any) -> None:
        raise DatabaseUnavailable("the database is down")

    store.create = unavailable  # type: ignore[method-assign]
    with authed(TestClient(app)) as http:
        single = sdk(http, role_key(settings, "single", max_concurrency=1))
        with pytest.raises(openai.APIStatusError) as err:
            single.responses.create(model="fake", input="hi", background=True)
        assert err.value.status_code == 503
        assert slow.aborted  # admitted, then stopped: it does not run on unseen
        store.create = create  # type: ignore[method-assign]
        out = single.responses.create(model="fake", input="hi", background=True)  # its slot was given back
        assert single.responses.cancel(out.id).status == "cancelled"
    assert stored_rows(settings) == 1


def test_request_log_and_metrics(settings: Settings, engine: FakeEngine, api_key: str) -> None:
    with TestClient(create_app(settings, engine=engine)) as http:
        http.headers.update(bearer(api_key))
        client = sdk(http, api_key)
        out = client.responses.create(model="fake", input="hi")
        with client.responses.stream(model="fake", input="hi", max_output_tokens=3) as stream:
            list(stream)
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="nope", input="hi")
        client.responses.retrieve(out.id)
        queued = client.responses.create(model="fake", input="hi", background=True, max_output_tokens=4)
        assert wait_for(client, queued.id, ("incomplete",)).status == "incomplete"
        metrics = http.get("/metrics").text
    assert 'llm_server_requests_total{method="POST",route="/v1/responses",status="2xx"} 3.0' in metrics
    assert 'llm_server_requests_total{method="POST",route="/v1/responses",status="4xx"} 1.0' in metrics
    assert out.usage is not None
    rows = [r for r in log_rows(settings) if r["route"] == "/v1/responses"]
    assert [(r["status"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        (200, out.usage.input_tokens, out.usage.output_tokens),
        (200, out.usage.input_tokens, 3),
        (404, 0, 0),
        (200, out.usage.input_tokens, 4),  # the background turn's row is written when it settles
    ]
    assert [r["finish_reason"] for r in rows] == ["stop", "length", None, "length"]


def test_streamed_turn_is_charged_and_stored_like_a_plain_one(client: openai.OpenAI, http: httpx.Client) -> None:
    with client.responses.stream(model="fake", input="hi") as stream:
        final = stream.get_final_response()
    plain = client.responses.create(model="fake", input="hi")
    assert final.usage == plain.usage
    stored = http.get(f"/v1/responses/{final.id}").json()
    assert stored["status"] == "completed" and stored["output"][0]["content"][0]["text"] == TEXT


def test_a_stream_left_early_is_not_stored(settings: Settings, api_key: str) -> None:
    engine = FakeEngine(["x"] * 300, delay_s=0.01)
    with (
        live_server(create_app(settings, engine=engine)) as base,
        httpx.Client(base_url=base, headers=bearer(api_key), timeout=10) as http,
    ):
        body = {"model": "fake", "input": "hi", "stream": True}
        with http.stream("POST", "/v1/responses", json=body) as r:
            lines = r.iter_lines()
            created = json.loads(next(line for line in lines if line.startswith("data: "))[len("data: ") :])
            assert next(line for line in lines if "output_text.delta" in line)
        deadline = time.monotonic() + 5
        while not engine.aborted:
            assert time.monotonic() < deadline, "the engine kept generating"
            time.sleep(0.02)
        time.sleep(0.3)  # the turn has ended: it would be stored by now
        response_id = created["response"]["id"]
        assert http.get(f"/v1/responses/{response_id}").status_code == 404
        done = http.post("/v1/responses", json={**body, "stream": False, "max_output_tokens": 2})
        assert http.get(f"/v1/responses/{done.json()['id']}").status_code == 200


def test_two_replicas_share_responses_and_cancel_through_postgres(postgres_url: str, tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, database_url=postgres_url, key_pepper=TEST_PEPPER)
    asyncio.run(migrate.upgrade(postgres_url))
    key = asyncio.run(add_role_key(s, "replicated"))
    slow = FakeEngine(["x"] * 500, delay_s=0.02)
    with (
        TestClient(create_app(s, engine=slow)) as a_http,
        TestClient(create_app(s, engine=FakeEngine(SCRIPT))) as b_http,
    ):
        a, b = sdk(a_http, key), sdk(b_http, key)
        done = b.responses.create(model="fake", input="hi")
        assert a.responses.retrieve(done.id).output_text == TEXT
        follow = a.responses.create(model="fake", input="more", previous_response_id=done.id, max_output_tokens=2)
        assert len(b.responses.input_items.list(follow.id).data) == 3

        running = a.responses.create(model="fake", input="hi", background=True)
        assert wait_for(b, running.id, ("in_progress",)).status == "in_progress"
        cancelled = b.responses.cancel(running.id)  # B does not run it: A sees the flag and stops
        assert cancelled.status == "cancelled"
        assert a.responses.retrieve(running.id).status == "cancelled" and slow.aborted
        gone = a.responses.create(model="fake", input="hi", background=True)
        assert wait_for(b, gone.id, ("in_progress",)).status == "in_progress"
        b.responses.delete(gone.id)  # deleted on B: A sees its row gone and stops generating what nobody can read
        deadline = time.monotonic() + 5
        while len(slow.aborted) < 2:
            assert time.monotonic() < deadline, "the turn deleted on another replica kept running"
            time.sleep(0.05)
        b.responses.delete(done.id)
        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve(done.id)


def test_a_background_turn_cut_by_shutdown_is_stored_failed(
    settings: Settings, authed: Callable[[Any], Any], api_key: str
) -> None:
    spy = LoopSpy(400)
    app = create_app(settings, engine=FakeEngine(spy, delay_s=0.02))
    with authed(TestClient(app)) as http:
        client = sdk(http, api_key)
        running = client.responses.create(model="fake", input="hi", background=True)
        assert wait_for(client, running.id, ("in_progress",)).status == "in_progress"
        spy.on_loop(app_state(app).lifecycle.begin, 0.1)  # SIGTERM with a 0.1 s grace
        started = time.monotonic()
    assert time.monotonic() - started < 5
    with authed(TestClient(create_app(settings, engine=FakeEngine(SCRIPT)))) as http:
        stored = sdk(http, api_key).responses.retrieve(running.id)
    assert stored.status == "failed" and stored.error is not None and stored.error.code == "overloaded"


# ---- a tenant's reach -------------------------------------------------------------------------------------------


def test_a_long_conversation_is_prepared_off_the_loop_and_bounded(
    tmp_path: Path, template_db: tuple[Path, str], authed: Callable[[Any], Any]
) -> None:
    data = tmp_path / "bounded"
    data.mkdir()
    shutil.copy(template_db[0], data / DB_NAME)
    settings = Settings(data_dir=data, key_pepper=TEST_PEPPER, request_max_body_size=30_000)
    engine = FakeEngine(SCRIPT, max_model_len=100_000)
    tokenizer = TemplateTokenizer(PLAIN)
    engine._tokenizer = tokenizer
    on_loop: list[bool] = []
    render = tokenizer.render_chat

    def spying(*args: Any, **kwargs: Any) -> list[int]:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return render(*args, **kwargs)

    tokenizer.render_chat = spying  # type: ignore[method-assign]
    with authed(TestClient(create_app(settings, engine=engine))) as http:
        client = sdk(http, template_db[1])
        short = client.responses.create(model="fake", input="hi")
        assert client.responses.create(model="fake", input="more", previous_response_id=short.id).status == "completed"
        assert on_loop == [True, True]  # small bodies and a small conversation: prepared inline
        first = client.responses.create(model="fake", input="x" * 18_000)
        second = client.responses.create(model="fake", input="y", previous_response_id=first.id)
        assert second.status == "completed"
        assert on_loop[2:] == [False, False]  # a short body continuing a long conversation is prepared in a thread
        third = client.responses.create(model="fake", input="z" * 18_000, previous_response_id=second.id)
        assert third.status == "completed"  # ~36 kB stored: over the bound for a continuation
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="fake", input="again", previous_response_id=third.id)
        assert err.value.param == "previous_response_id" and err.value.code == "context_length_exceeded"
        assert len(on_loop) == 5  # refused before the conversation was decoded or rendered
        assert client.responses.input_items.list(third.id).data  # still readable
