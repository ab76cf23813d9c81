"""Remote models with real processes on 127.0.0.1: a gateway ``serve`` routing names to other ``serve`` processes.

The gateway serves ``local`` (``builtin:echo``) and ``local-tiny`` in-process and forwards ``remote-echo`` /
``remote-tiny`` to two upstream llm-server processes, ``remote-slow`` to the echo upstream with a short timeout
and ``remote-flaky`` to a port whose upstream each test starts and stops.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.db import create_postgres_database, drop_postgres_database, run_sync
from tests.live import free_port
from tests.process import ROOT, ServeProcess, prepare_data_dir, serve_env, start, stop, wait_ready

pytestmark = pytest.mark.slow

ECHO_DELAY_MS = "20"  # the echo upstream's pace: long messages take seconds, short ones milliseconds
SLOW_TIMEOUT_S = 0.5


def models_toml(echo: str, tiny: str, flaky_port: int) -> str:
    return f"""
[[models]]
name = "local"
backend = "hf"
model = "builtin:echo"

[[models]]
name = "local-tiny"
backend = "hf"
model = "builtin:tiny-chat"
dtype = "float32"

[[models]]
name = "remote-echo"
backend = "openai"
base_url = "{echo}/v1"
api_key_env = "UPSTREAM_KEY"
upstream_model = "echo"
health_interval_s = 1

[[models]]
name = "remote-tiny"
backend = "openai"
base_url = "{tiny}/v1"
api_key_env = "UPSTREAM_KEY"
upstream_model = "tiny-chat"

[[models]]
name = "remote-slow"
backend = "openai"
base_url = "{echo}/v1"
api_key_env = "UPSTREAM_KEY"
upstream_model = "echo"
timeout_s = {SLOW_TIMEOUT_S}
retries = 0

[[models]]
name = "remote-flaky"
backend = "openai"
base_url = "http://127.0.0.1:{flaky_port}/v1"
api_key_env = "UPSTREAM_KEY"
upstream_model = "echo"
retries = 1
health_interval_s = 1
"""


class Cluster:
    """The processes of this module and what the tests need to reach them."""

    def __init__(
        self, gateway: ServeProcess, echo: ServeProcess, tiny: ServeProcess, flaky_port: int, key: str
    ) -> None:
        self.gateway, self.echo, self.tiny, self.flaky_port, self.key = gateway, echo, tiny, flaky_port, key
        self._clients: list[openai.OpenAI] = []

    def client(self, key: str | None = None, base: str | None = None) -> openai.OpenAI:
        made = openai.OpenAI(base_url=f"{base or self.gateway.base}/v1", api_key=key or self.key, max_retries=0)
        self._clients.append(made)
        return made

    def direct(self, srv: ServeProcess) -> openai.OpenAI:
        return self.client(base=srv.base)

    def close(self) -> None:
        for c in self._clients:
            c.close()

    def admin(self, method: str, path: str, **kw: Any) -> Any:
        r = httpx.request(method, f"{self.gateway.base}/admin{path}", headers=self.auth, timeout=10, **kw)
        assert r.status_code < 300, r.text
        return r.json()

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def role_key(self, role: str, **limits: Any) -> str:
        self.admin("POST", "/roles", json={"name": role, **limits})
        return str(self.admin("POST", "/keys", json={"name": role, "role": role})["key"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, template_db: tuple[Path, str]) -> Iterator[Cluster]:
    db, key = template_db
    started: list[ServeProcess] = []
    try:
        echo = start(prepare_data_dir(tmp_path_factory.mktemp("up-echo"), db), model="builtin:echo",
                     echo_token_delay_ms=ECHO_DELAY_MS)  # fmt: skip
        tiny = start(
            prepare_data_dir(tmp_path_factory.mktemp("up-tiny"), db), model="builtin:tiny-chat", dtype="float32"
        )
        started += [echo, tiny]
        wait_ready(echo)
        wait_ready(tiny)
        gw_dir = prepare_data_dir(tmp_path_factory.mktemp("gateway"), db)
        flaky_port = free_port()
        (gw_dir / "models.toml").write_text(models_toml(echo.base, tiny.base, flaky_port))
        gateway = start(gw_dir, "--models-file", str(gw_dir / "models.toml"), env={"UPSTREAM_KEY": key})
        started.append(gateway)
        wait_ready(gateway)
        made = Cluster(gateway, echo, tiny, flaky_port, key)
        yield made
        made.close()
    finally:
        for srv in started:
            stop(srv)


def gauge(srv: ServeProcess, name: str, model: str) -> float:
    text = httpx.get(f"{srv.base}/metrics", timeout=5).text
    match = re.search(rf'^{name}{{model_name="{re.escape(model)}"}} (\S+)$', text, re.M)
    assert match, f"{name} for {model} not in /metrics"
    return float(match.group(1))


def wait_for(check: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- routing, streams, usage ---------------------------------------------------------------------------------
def test_models_lists_local_and_remote_and_readyz_reports_upstreams(cluster: Cluster) -> None:
    ids = [m.id for m in cluster.client().models.list()]
    assert ids == ["local", "local-tiny", "remote-echo", "remote-tiny", "remote-slow", "remote-flaky"]
    body = httpx.get(f"{cluster.gateway.base}/readyz").json()
    assert body["status"] == "ready"
    assert body["upstreams"]["remote-echo"]["status"] == "ok"
    assert body["upstreams"]["remote-tiny"]["status"] == "ok"
    assert body["upstreams"]["remote-flaky"]["status"] == "down"  # nothing listens there yet; still 200


def test_remote_chat_matches_the_upstream_called_directly(cluster: Cluster) -> None:
    messages: Any = [{"role": "user", "content": "route me through the gateway"}]
    via = cluster.client().chat.completions.create(model="remote-echo", messages=messages)
    direct = cluster.direct(cluster.echo).chat.completions.create(model="echo", messages=messages)
    assert via.model == "remote-echo" and via.id.startswith("chatcmpl-") and via.id != direct.id
    assert via.choices[0].message.content == direct.choices[0].message.content == "route me through the gateway"
    assert via.choices[0].finish_reason == "stop"
    assert via.usage == direct.usage  # the upstream's own count, not an estimate


def test_remote_stream_is_reframed_exactly(cluster: Cluster) -> None:
    body = {"model": "remote-echo", "messages": [{"role": "user", "content": "abc"}], "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{cluster.gateway.base}/v1/chat/completions", json=body, headers=cluster.auth) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read()
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"" and frames[-2] == b"data: [DONE]"
    chunks = [json.loads(f.removeprefix(b"data: ")) for f in frames[:-2]]
    assert all(f.startswith(b"data: {") for f in frames[:-2])
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert {c["model"] for c in chunks} == {"remote-echo"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"] for c in chunks[1:-2]]
    assert content == [{"content": "a"}, {"content": "b"}, {"content": "c"}]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-2]["choices"][0]["delta"] == {}
    assert sum(1 for c in chunks for ch in c["choices"] if ch["finish_reason"]) == 1
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4  # 3 characters + EOS


def test_remote_tiny_model_stream_equals_non_stream_and_direct(cluster: Cluster) -> None:
    client = cluster.client()
    kw: Any = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 12}
    whole = client.chat.completions.create(model="remote-tiny", **kw)
    parts = client.chat.completions.create(
        model="remote-tiny", stream=True, stream_options={"include_usage": True}, **kw
    )
    chunks = list(parts)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    direct = cluster.direct(cluster.tiny).chat.completions.create(model="tiny-chat", **kw)
    assert streamed == whole.choices[0].message.content == direct.choices[0].message.content
    assert chunks[-1].usage is not None and whole.usage is not None and direct.usage is not None
    usages = (chunks[-1].usage, whole.usage, direct.usage)
    assert len({(u.prompt_tokens, u.completion_tokens, u.total_tokens) for u in usages}) == 1
    # The upstream's count comes through (the first time the prompt was computed there; the direct call was answered
    # from the upstream's completion cache); the stream, replayed from the gateway's completion cache, computed nothing.
    assert whole.usage.prompt_tokens_details is not None and direct.usage.prompt_tokens_details is not None
    assert whole.usage.prompt_tokens_details.cached_tokens == 0
    assert direct.usage.prompt_tokens_details.cached_tokens == direct.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details is not None
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == chunks[-1].usage.prompt_tokens
    text = client.completions.create(model="remote-tiny", prompt="Once upon", max_tokens=8, temperature=0)
    direct_text = cluster.direct(cluster.tiny).completions.create(model="tiny-chat", prompt="Once upon", max_tokens=8,
                                                                   temperature=0)  # fmt: skip
    assert text.model == "remote-tiny" and text.choices[0].text == direct_text.choices[0].text
    assert text.usage is not None and direct_text.usage is not None
    assert text.usage.total_tokens == direct_text.usage.total_tokens  # (the direct call was a completion-cache hit)


def test_two_local_models_served_beside_remote_ones(cluster: Cluster) -> None:
    client = cluster.client()
    reply = client.chat.completions.create(model="local", messages=[{"role": "user", "content": "here"}])
    assert reply.model == "local" and reply.choices[0].message.content == "here"
    kw: Any = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 12}
    tiny = client.chat.completions.create(model="local-tiny", **kw)
    # the same weights (built deterministically) in-process and in the upstream give the same greedy answer
    remote = client.chat.completions.create(model="remote-tiny", **kw)
    assert tiny.model == "local-tiny" and tiny.choices[0].message.content == remote.choices[0].message.content
    assert tiny.usage is not None and remote.usage is not None
    assert tiny.usage.model_dump(exclude={"prompt_tokens_details"}) == remote.usage.model_dump(
        exclude={"prompt_tokens_details"}
    )


def test_native_generate_on_a_remote_model(cluster: Cluster) -> None:
    r = httpx.post(f"{cluster.gateway.base}/v1/generate", headers=cluster.auth,
                   json={"model": "remote-echo", "prompt": "native", "max_new_tokens": 3})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "remote-echo" and body["finish_reason"] == "length" and len(body["output"]) == 3
    assert body["usage"]["completion_tokens"] == 3


# -- gateway features on remote models ---------------------------------------------------------------------------
def test_rate_limit_and_quota_apply_to_remote_models(cluster: Cluster) -> None:
    limited = cluster.role_key("remote-rpm", rpm=2)
    client = cluster.client(limited)
    msg: Any = [{"role": "user", "content": "x"}]
    for _ in range(2):
        ok = client.chat.completions.with_raw_response.create(model="remote-echo", messages=msg)
        assert ok.headers["x-ratelimit-limit-requests"] == "2"
    with pytest.raises(openai.RateLimitError) as rpm:
        client.chat.completions.create(model="remote-echo", messages=msg)
    assert rpm.value.code == "rate_limit_exceeded" and int(rpm.value.response.headers["retry-after"]) >= 1

    quota = cluster.role_key("remote-quota", monthly_requests=1)
    client = cluster.client(quota)
    client.chat.completions.create(model="remote-echo", messages=msg)
    with pytest.raises(openai.RateLimitError) as q:
        client.chat.completions.create(model="remote-echo", messages=msg)
    assert q.value.code == "insufficient_quota" and q.value.response.headers["x-should-retry"] == "false"

    denied = cluster.role_key("local-only", models=["local"])
    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        cluster.client(denied).chat.completions.create(model="remote-echo", messages=msg)
    assert forbidden.value.code == "model_not_allowed"


def test_usage_is_reconciled_to_the_upstreams_count(cluster: Cluster) -> None:
    key = cluster.role_key("remote-tokens", monthly_tokens=100_000)
    key_id = next(k["id"] for k in cluster.admin("GET", "/keys")["data"] if k["name"] == "remote-tokens")
    reply = cluster.client(key).chat.completions.create(
        model="remote-echo", messages=[{"role": "user", "content": "count these tokens"}]
    )
    assert reply.usage is not None
    usage = cluster.admin("GET", "/usage", params={"key": key_id})["data"]
    assert usage == [{"key_id": key_id, "month": usage[0]["month"], "tokens": reply.usage.total_tokens, "requests": 1}]


# -- failures ----------------------------------------------------------------------------------------------------
def test_upstream_down_is_502_and_recovers_when_it_returns(cluster: Cluster, tmp_path: Path,
                                                           template_db: tuple[Path, str]) -> None:  # fmt: skip
    client = cluster.client()
    msg: Any = [{"role": "user", "content": "are you there"}]
    with pytest.raises(openai.InternalServerError) as down:
        client.chat.completions.create(model="remote-flaky", messages=msg)
    assert down.value.status_code == 502 and down.value.code == "upstream_error"
    assert down.value.body["type"] == "server_error"  # type: ignore[index]
    assert cluster.key not in down.value.response.text
    ready = httpx.get(f"{cluster.gateway.base}/readyz")
    assert ready.status_code == 200 and ready.json()["upstreams"]["remote-flaky"]["status"] == "down"

    flaky = start(prepare_data_dir(tmp_path / "flaky", template_db[0]), port=cluster.flaky_port, model="builtin:echo")
    try:
        wait_ready(flaky)
        assert client.chat.completions.create(model="remote-flaky", messages=msg).choices[0].message.content == (
            "are you there"
        )
        wait_for(lambda: httpx.get(f"{cluster.gateway.base}/readyz").json()["upstreams"]["remote-flaky"]["status"]
                 == "ok", what="the health check to see the upstream")  # fmt: skip
    finally:
        stop(flaky)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="remote-flaky", messages=msg)


def test_slow_upstream_is_504_and_its_request_is_closed(cluster: Cluster) -> None:
    long = "s" * 100  # 100 tokens at 20 ms: 2 s, four times the 0.5 s timeout
    with pytest.raises(openai.APIStatusError) as slow:
        cluster.client().chat.completions.create(model="remote-slow", messages=[{"role": "user", "content": long}])
    assert slow.value.status_code == 504 and slow.value.code == "upstream_timeout"
    wait_for(lambda: gauge(cluster.echo, "llm_server_num_requests_running", "echo") == 0, what="upstream abort")
    assert gauge(cluster.gateway, "llm_server_num_requests_running", "remote-slow") == 0


def test_client_disconnect_closes_the_upstream_request(cluster: Cluster) -> None:
    body = {"model": "remote-echo", "messages": [{"role": "user", "content": "d" * 400}], "stream": True}
    with (
        httpx.Client(timeout=10) as http,
        http.stream("POST", f"{cluster.gateway.base}/v1/chat/completions", json=body, headers=cluster.auth) as r,
    ):
        lines = r.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith("data: ")
            if seen >= 5:
                break
        assert gauge(cluster.echo, "llm_server_num_requests_running", "echo") == 1
        assert gauge(cluster.gateway, "llm_server_num_requests_running", "remote-echo") == 1
    # the client went away 5 tokens into an 8-second answer
    wait_for(lambda: gauge(cluster.echo, "llm_server_num_requests_running", "echo") == 0, timeout_s=5,
             what="the upstream's running gauge to return to 0")  # fmt: skip
    wait_for(lambda: gauge(cluster.gateway, "llm_server_num_requests_running", "remote-echo") == 0, timeout_s=5,
             what="the gateway's running gauge to return to 0")  # fmt: skip


def test_upstream_key_never_leaves_the_gateway(cluster: Cluster) -> None:
    texts = [httpx.get(f"{cluster.gateway.base}{p}", headers=cluster.auth).text for p in ("/readyz", "/metrics",
             "/v1/models")]  # fmt: skip
    texts.append(cluster.gateway.log())
    # The tests' key is both the client's and the upstream's: only its prefix may show anywhere.
    assert all(cluster.key not in t for t in texts)


# -- two gateway replicas ----------------------------------------------------------------------------------------
def test_two_gateway_replicas_share_one_limit(cluster: Cluster, tmp_path: Path, postgres_url: str,
                                              redis_url: str) -> None:  # fmt: skip
    db_url = run_sync(create_postgres_database(postgres_url))
    shared = {
        "database_url": db_url,
        "ratelimit_storage_uri": f"async+{redis_url}",
        "key_pepper": "replicas-pepper-0123456789abcdef",
    }
    models = tmp_path / "models.toml"
    models.write_text(f'[[models]]\nname = "remote-echo"\nbackend = "openai"\nbase_url = "{cluster.echo.base}/v1"\n'
                      f'api_key_env = "UPSTREAM_KEY"\nupstream_model = "echo"\n')  # fmt: skip
    replicas: list[ServeProcess] = []
    try:
        for i in range(2):
            folder = tmp_path / f"replica{i}"
            folder.mkdir()
            replicas.append(start(folder, "--models-file", str(models), env={"UPSTREAM_KEY": cluster.key}, **shared))
        for srv in replicas:
            wait_ready(srv)
        admin = _admin_key_for(replicas[0], shared)
        h = {"Authorization": f"Bearer {admin}"}
        httpx.post(
            f"{replicas[0].base}/admin/roles", json={"name": "shared-rpm", "rpm": 4}, headers=h
        ).raise_for_status()
        created = httpx.post(f"{replicas[1].base}/admin/keys", json={"name": "k", "role": "shared-rpm"}, headers=h)
        created.raise_for_status()
        key = created.json()["key"]
        statuses = []
        msg = [{"role": "user", "content": "hi"}]
        for n in range(6):  # alternate replicas: one window of 4 requests per minute across both
            url, body = f"{replicas[n % 2].base}/v1/chat/completions", {"model": "remote-echo", "messages": msg}
            r = httpx.post(url, headers={"Authorization": f"Bearer {key}"}, json=body, timeout=10)
            statuses.append(r.status_code)
        assert statuses == [200, 200, 200, 200, 429, 429]
    finally:
        for srv in replicas:
            stop(srv)
        run_sync(drop_postgres_database(db_url))


def _admin_key_for(srv: ServeProcess, shared: dict[str, str]) -> str:
    """An admin key created with the CLI against the replicas' shared database."""
    argv = [sys.executable, "-m", "server", "keys", "create", "--name", "ops", "--role", "admin", "--json"]
    env = serve_env(srv.data_dir, **shared)
    out = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return str(json.loads(out.stdout)["key"])
