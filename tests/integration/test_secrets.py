"""Secrets and access control: keys never leak, failed key checks are limited per address, admin and CORS are closed.

docs/SECURITY.md names these tests next to the promise each one checks.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server.admission.throttle import client_address
from server.app import create_app
from server.auth.keys import DISPLAY_PREFIX_LEN, digest, generate_key
from server.cli import main
from server.engine.fake import FakeEngine
from server.errors import OpenAIError
from server.logs import JSONFormatter
from server.metrics import Metrics
from server.settings import Settings, load_settings
from server.wiring.services import Services, build_services
from server.wiring.state import app_state
from tests.conftest import TEST_PEPPER, add_role_key, bearer
from tests.live import live_server

MSGS = [{"role": "user", "content": "hi"}]
CHAT = {"model": "fake", "messages": MSGS}


def from_address(base: str, address: str) -> httpx.Client:
    """A client whose connections come from ``address`` (any 127.0.0.0/8 address reaches the loopback server)."""
    return httpx.Client(base_url=base, transport=httpx.HTTPTransport(local_address=address), timeout=20)


def secret_middle(key: str) -> str:
    """The part of a key that nothing may ever show: all but the display prefix and the last 4 characters."""
    return key[DISPLAY_PREFIX_LEN:-4]


def dump_sqlite(path: Path) -> str:
    """Every row of every table, as text."""
    con = sqlite3.connect(path)
    try:
        lines = []
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in con.execute(f'SELECT * FROM "{table}"'):
                cells = [v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in row]
                lines.append(f"{table}: " + " | ".join(cells))
        return "\n".join(lines)
    finally:
        con.close()


def server_log(caplog: pytest.LogCaptureFixture) -> str:
    """What the server logged (the test's own HTTP client logs the URLs it requests: not the server's output)."""
    return "\n".join(
        f"{r.name} {r.levelname} {r.getMessage()} {r.__dict__}"
        for r in caplog.records
        if not r.name.startswith(("httpx", "httpcore"))
    )


@contextmanager
def json_log() -> Iterator[io.StringIO]:
    """Everything logged meanwhile, formatted as the JSON log (``LOG_FORMAT=json``), access log included."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def limited_services(settings: Settings, per_minute: int | None) -> tuple[Settings, Services, list[str]]:
    """Services with ``AUTH_FAILURES_PER_MINUTE=per_minute`` whose key lookups (database round trips) are recorded."""
    s = msgspec.structs.replace(settings, auth_failures_per_minute=per_minute)
    services = build_services(s, Metrics())
    lookups: list[str] = []
    real = services.auth._lookup

    async def counting(d: str) -> Any:
        lookups.append(d)
        return await real(d)

    services.auth._lookup = counting
    return s, services, lookups


def rate_limited_auth(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith('llm_server_rate_limited_total{limit="auth",role="anonymous"}'):
            return float(line.split()[-1])
    return 0.0


# ---- brute force ----------------------------------------------------------------------------------------


def test_failed_key_checks_are_limited_per_client_address(settings: Settings, api_key: str) -> None:
    s, services, _ = limited_services(settings, 5)
    app = create_app(s, engine=FakeEngine(["ok"]), services=services)
    with live_server(app) as base, from_address(base, "127.0.0.9") as admin:
        revoked = admin.post("/admin/keys", json={"name": "gone", "role": "default"}, headers=bearer(api_key)).json()
        assert admin.post(f"/admin/keys/{revoked['id']}/revoke", headers=bearer(api_key)).status_code == 200
        plain = admin.post("/admin/keys", json={"name": "plain", "role": "default"}, headers=bearer(api_key)).json()
        with from_address(base, "127.0.0.2") as attacker, from_address(base, "127.0.0.3") as neighbour:
            for _ in range(3):  # no key at all guesses nothing: 401, not counted
                assert attacker.get("/v1/models").status_code == 401
            failures = [
                bearer("nope"),  # malformed: no database round trip, still counted
                {"X-API-Key": "sk-llm-" + "A" * 30},  # right shape, wrong checksum
                bearer(generate_key()),  # well-formed, unknown
                {"X-API-Key": revoked["key"]},  # revoked
                bearer(api_key[:-1] + ("x" if api_key[-1] != "x" else "y")),  # one character off
            ]
            for headers in failures:
                r = attacker.get("/v1/models", headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            refused = [
                attacker.get("/v1/models", headers=bearer(generate_key())),
                attacker.post("/v1/chat/completions", json=CHAT, headers={"X-API-Key": generate_key()}),
                attacker.get("/v1/models", headers={"X-API-Key": revoked["key"]}),
                attacker.get("/v1/models", headers=bearer("nope")),
                attacker.get("/admin/keys", headers=bearer(generate_key())),
            ]
            for r in refused:
                assert r.status_code == 429, r.text
                err = r.json()["error"]
                assert err["type"] == "requests" and err["code"] == "rate_limit_exceeded"
                assert 1 <= int(r.headers["retry-after"]) <= 60 and int(r.headers["retry-after-ms"]) > 0
                assert api_key not in r.text and secret_middle(api_key) not in r.text
            assert attacker.get("/v1/models").status_code == 401  # still not counted, still no guess
            # Valid keys are never refused for their address, on /v1 and /admin alike.
            assert attacker.get("/v1/models", headers=bearer(api_key)).status_code == 200
            assert attacker.post("/v1/chat/completions", json=CHAT, headers=bearer(plain["key"])).status_code == 200
            assert attacker.get("/admin/keys", headers=bearer(api_key)).status_code == 200
            assert attacker.get("/admin/keys", headers=bearer(plain["key"])).status_code == 403  # its role's answer
            # Other addresses are unaffected: valid keys work, their own failures are still plain 401s.
            assert neighbour.get("/v1/models", headers=bearer(api_key)).status_code == 200
            assert neighbour.post("/v1/chat/completions", json=CHAT, headers=bearer(api_key)).status_code == 200
            assert neighbour.get("/v1/models", headers=bearer(generate_key())).status_code == 401
        assert rate_limited_auth(admin.get("/metrics").text) == len(refused)


def test_a_shared_address_over_the_limit_never_locks_out_valid_keys(settings: Settings, api_key: str) -> None:
    """30+ bad keys from one address (a proxy in front of everyone): valid keys still get 200, unknown keys 429."""
    s, services, lookups = limited_services(settings, 30)
    assert s.auth_failures_per_minute == Settings().auth_failures_per_minute == 30  # the default
    plain = asyncio.run(add_role_key(s, "plain"))
    app = create_app(s, engine=FakeEngine(["ok"]), services=services)
    with TestClient(app) as http:
        statuses = [http.get("/v1/models", headers=bearer(generate_key())).status_code for _ in range(35)]
        assert statuses == [401] * 30 + [429] * 5
        assert http.get("/admin/keys", headers={"X-API-Key": generate_key()}).status_code == 429
        for key in (api_key, plain):
            assert http.get("/v1/models", headers=bearer(key)).status_code == 200
            assert http.post("/v1/chat/completions", json=CHAT, headers={"X-API-Key": key}).status_code == 200
        assert http.get("/admin/keys", headers=bearer(api_key)).status_code == 200
        assert http.post("/admin/roles", json={"name": "more"}, headers=bearer(api_key)).status_code == 201
        assert http.get("/admin/keys", headers=bearer(plain)).status_code == 403
        services.auth.forget()  # the cache expired: a valid key is looked up, and still never refused
        before = len(lookups)
        assert http.get("/admin/keys", headers=bearer(api_key)).status_code == 200
        assert len(lookups) == before + 1
        assert http.get("/v1/models", headers=bearer(generate_key())).status_code == 429


def test_a_cached_valid_key_costs_the_throttle_nothing(settings: Settings, api_key: str) -> None:
    s, services, lookups = limited_services(settings, 2)
    assert services.throttle is not None
    asked: list[str] = []
    real = services.throttle.exhausted

    async def counting(address: str) -> float | None:
        asked.append(address)
        return await real(address)

    services.throttle.exhausted = counting  # type: ignore[method-assign]
    with TestClient(create_app(s, engine=FakeEngine(["ok"]), services=services)) as http:
        assert [http.get("/v1/models", headers=bearer(generate_key())).status_code for _ in range(3)] == [401, 401, 429]
        assert len(asked) == 3 and len(lookups) == 3
        assert http.get("/v1/models", headers=bearer(api_key)).status_code == 200  # first use: looked up
        asked.clear()
        lookups.clear()
        for _ in range(5):
            assert http.get("/v1/models", headers=bearer(api_key)).status_code == 200
        assert asked == [] and lookups == []  # no storage round trip, no database


@pytest.mark.anyio
async def test_throttled_lookups_share_a_narrow_lane(settings: Settings, api_key: str) -> None:
    """However many guesses a throttled address sends at once, at most THROTTLED_LOOKUPS reach the database."""
    from server.admission.throttle import THROTTLED_LOOKUPS
    from server.api.guards import _authenticate

    _, services, _ = limited_services(settings, 1)
    assert services.throttle is not None
    real = services.auth._lookup
    running = peak = 0
    release = asyncio.Event()

    async def slow(d: str) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
            return await real(d)
        finally:
            running -= 1

    services.auth._lookup = slow
    scope = {"client": ("198.51.100.7", 1)}
    guard = asyncio.create_task(_authenticate(services, scope, generate_key()))
    release.set()
    with pytest.raises(OpenAIError) as first:  # the one failure this address is allowed
        await guard
    assert first.value.status == 401
    release.clear()
    guesses = [asyncio.create_task(_authenticate(services, scope, generate_key())) for _ in range(20)]
    valid = asyncio.create_task(_authenticate(services, scope, api_key))
    for _ in range(100):  # let every task run up to its wait
        await asyncio.sleep(0)
    assert peak == THROTTLED_LOOKUPS  # the other 19 guesses and the valid key wait their turn
    release.set()
    outcomes = await asyncio.gather(*guesses, return_exceptions=True)
    assert all(isinstance(e, OpenAIError) and e.status == 429 for e in outcomes)
    assert (await valid).key_id and peak == THROTTLED_LOOKUPS
    await services.db.close()


def test_auth_failure_limit_unlimited_and_from_the_environment(settings: Settings) -> None:
    env = {"LLM_SERVER_AUTH_FAILURES_PER_MINUTE": "unlimited", "LLM_SERVER_DATA_DIR": str(settings.data_dir)}
    assert load_settings(environ=env, dotenv=None).auth_failures_per_minute is None
    env["LLM_SERVER_AUTH_FAILURES_PER_MINUTE"] = "7"
    assert load_settings(environ=env, dotenv=None).auth_failures_per_minute == 7
    assert Settings().auth_failures_per_minute == 30
    s, services, lookups = limited_services(settings, None)
    assert services.throttle is None
    with TestClient(create_app(s, engine=FakeEngine(["ok"]), services=services)) as http:
        statuses = {http.get("/v1/models", headers=bearer(generate_key())).status_code for _ in range(40)}
    assert statuses == {401} and len(lookups) == 40


def test_malformed_keys_alone_trip_the_limit(settings: Settings, api_key: str) -> None:
    s, services, lookups = limited_services(settings, 3)
    with TestClient(create_app(s, engine=FakeEngine(["ok"]), services=services)) as http:
        statuses = [http.get("/v1/models", headers={"X-API-Key": f"guess-{i}"}).status_code for i in range(5)]
        assert statuses == [401, 401, 401, 429, 429]
        assert lookups == []  # malformed keys never reach the database
        assert http.get("/v1/models", headers=bearer(generate_key())).status_code == 429
        assert http.get("/v1/models", headers=bearer(api_key)).status_code == 200


def test_client_address_groups_ipv6_by_64_and_unwraps_ipv4_mapped() -> None:
    assert client_address({"client": ("203.0.113.7", 5000)}) == "203.0.113.7"
    assert client_address({"client": ("2001:db8:1:2::1", 1)}) == client_address({"client": ("2001:db8:1:2:ffff::9", 2)})
    assert client_address({"client": ("2001:db8:1:2::1", 1)}) == "2001:db8:1:2::/64"
    assert client_address({"client": ("2001:db8:1:3::1", 1)}) != "2001:db8:1:2::/64"
    assert client_address({"client": ("::ffff:198.51.100.4", 1)}) == "198.51.100.4"
    assert client_address({"client": None}) == "unknown"
    assert client_address({"client": ("testclient", 50000)}) == "testclient"


def test_failed_key_checks_are_shared_across_replicas_through_redis(settings: Settings, redis_url: str) -> None:
    from tests.integration.test_scaleout import _cleanup_redis

    uri = redis_url.replace("redis://", "async+redis://", 1) if redis_url.startswith("redis://") else redis_url
    s = Settings(
        data_dir=settings.data_dir, key_pepper=TEST_PEPPER, ratelimit_storage_uri=uri, auth_failures_per_minute=3
    )
    valid = asyncio.run(add_role_key(s, "plain"))
    prefix = f"llmtest-{secrets.token_hex(6)}"
    apps = [
        create_app(s, engine=FakeEngine(["ok"]), services=build_services(s, Metrics(), ratelimit_key_prefix=prefix))
        for _ in range(2)
    ]
    try:
        with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
            assert b.get("/v1/models", headers=bearer(valid)).status_code == 200
            statuses = [c.get("/v1/models", headers=bearer(generate_key())).status_code for c in (a, b, a)]
            assert statuses == [401, 401, 401]
            assert b.get("/v1/models", headers=bearer(generate_key())).status_code == 429
            assert a.get("/v1/models", headers=bearer(generate_key())).status_code == 429
            app_state(a.app).services.auth.forget()
            assert a.get("/v1/models", headers=bearer(valid)).status_code == 200  # valid keys never refused
    finally:
        asyncio.run(_cleanup_redis(redis_url, prefix))


# ---- secrets never leak ---------------------------------------------------------------------------------


def test_full_keys_never_appear_in_logs_database_or_metrics(
    settings: Settings, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    s = msgspec.structs.replace(settings, auth_failures_per_minute=1000)
    app = create_app(s, engine=FakeEngine(["Hel", "lo", "!"]))
    shown: list[str] = []  # responses other than the one creating a key
    with json_log() as logged, live_server(app) as base, httpx.Client(base_url=base, timeout=20) as http:
        admin = bearer(api_key)

        def make(name: str, role: str) -> dict[str, Any]:
            r = http.post("/admin/keys", json={"name": name, "role": role}, headers=admin)
            assert r.status_code == 201
            return dict(r.json())

        assert http.post("/admin/roles", json={"name": "tight", "rpm": 1}, headers=admin).status_code == 201
        made = [make("ops", "admin"), make("app-1", "default"), make("app-2", "default"), make("slow", "tight")]
        revoked, rotated_from = make("revoked", "default"), make("rotated", "default")
        r = http.post(f"/admin/keys/{rotated_from['id']}/rotate", json={"grace_hours": 1}, headers=admin)
        rotated = r.json()
        shown.append(http.post(f"/admin/keys/{revoked['id']}/revoke", headers=admin).text)
        keys = [api_key, *(k["key"] for k in [*made, revoked, rotated_from, rotated])]
        valid = [api_key, *(k["key"] for k in [*made, rotated_from, rotated])]

        def call(headers: dict[str, str]) -> None:
            for method, path, body in [
                ("GET", "/v1/models", None),
                ("POST", "/v1/chat/completions", CHAT),
                ("POST", "/v1/chat/completions", {**CHAT, "stream": True}),
                ("POST", "/v1/completions", {"model": "fake", "prompt": "ab", "max_tokens": 2}),
                ("POST", "/v1/completions", {"model": "fake", "prompt": "ab", "stream": True,
                                             "stream_options": {"include_usage": True}}),
                ("POST", "/v1/generate", {"prompt": "x", "temperature": 0, "max_new_tokens": 3}),
                ("POST", "/v1/stream", {"prompt": "x", "max_new_tokens": 3}),
                ("POST", "/v1/chat/completions", {**CHAT, "model": "nope"}),  # 404
                ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": 10**9}),  # 400
                ("GET", "/admin/keys", None),  # 403 for non-admin roles
            ]:  # fmt: skip
                shown.append(http.request(method, path, json=body, headers=headers).text)
            shown.append(http.post("/v1/chat/completions", content=b"{oops", headers=headers).text)

        for key in valid:
            call(bearer(key))
            call({"X-API-Key": key})
        for key in keys:  # revoked, and malformed variants of every key
            for bad in (key, key[:-1], key + "x", key[:-1] + ("A" if key[-1] != "A" else "B"), f"Bearer {key}"):
                shown.append(http.get("/v1/models", headers={"X-API-Key": bad}).text)
                shown.append(http.get("/v1/models", headers=bearer(bad)).text)
        shown += [
            http.get("/admin/keys", headers=admin).text,
            http.get("/admin/roles", headers=admin).text,
            http.get("/admin/usage", headers=admin).text,
            http.get("/metrics").text,
        ]
    # The server has stopped: the request-log writer and usage ledger flushed into the database.
    db_text = dump_sqlite(s.data_dir / "llm_server.db")
    raw_files = b"".join(p.read_bytes() for p in Path(s.data_dir).rglob("*") if p.is_file())
    json_text = logged.getvalue()
    assert '"logger": "server.access"' in json_text and "key_id" in json_text  # the access log was captured
    responses = "\n".join(shown)
    assert "rate_limit_exceeded" in responses and "invalid_api_key" in responses  # refusals were exercised
    for key in keys:
        assert digest(key, TEST_PEPPER.encode()) in db_text  # the keys table holds the HMAC, and we can see it
        for where, text in [
            ("caplog", server_log(caplog)),
            ("json log", json_text),
            ("database rows", db_text),
            ("responses and /metrics", responses),
        ]:
            assert key not in text, where
            assert secret_middle(key) not in text, where
        assert key.encode() not in raw_files and secret_middle(key).encode() not in raw_files


def test_admin_cli_prints_a_secret_only_when_creating_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("LLM_SERVER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LLM_SERVER_KEY_PEPPER", "cli-test-pepper-0123456789")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG)

    def run(*argv: str) -> str:
        main(list(argv))
        out = capsys.readouterr()
        return out.out + out.err

    first = json.loads(run("keys", "create", "--name", "a", "--json"))
    human = run("keys", "create", "--name", "b", "--role", "admin")
    second = human.splitlines()[0]
    assert second.startswith("sk-llm-") and "shown once" in human
    later = [
        run("keys", "list"),
        run("keys", "list", "--json"),
        run("roles", "list", "--json"),
        run("roles", "create", "team", "--rpm", "5"),
        run("usage"),
        run("usage", "--json"),
        run("db", "current"),
    ]
    rotated = json.loads(run("keys", "rotate", first["id"], "--json"))  # the replacement is a new key, shown once
    later += [run("keys", "revoke", rotated["id"]), run("keys", "list", "--json")]
    assert rotated["key"] not in (first["key"], second)
    text = "\n".join(later) + caplog.text
    for key in (first["key"], second, rotated["key"]):
        assert key not in text and secret_middle(key) not in text
    assert first["prefix"] in text  # listings identify keys by prefix and last 4 only


def test_admin_routes_refuse_missing_and_non_admin_keys(app: Litestar, settings: Settings, api_key: str) -> None:
    plain = asyncio.run(add_role_key(settings, "plain"))
    routes = [
        (method, route.path.replace("{key_id:str}", "key_x").replace("{name:str}", "default"))
        for route in app.routes
        if route.path.startswith("/admin")
        for method in sorted(route.methods - {"OPTIONS", "HEAD"})
    ]
    assert len(routes) >= 8
    with TestClient(app) as http:
        for method, path in routes:
            assert http.request(method, path).status_code == 401, (method, path)
            r = http.request(method, path, headers=bearer(plain), json={})
            assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", (method, path)
            assert http.request(method, path, headers=bearer(api_key), json={}).status_code not in (401, 403)


def test_keys_in_the_query_string_or_body_are_refused(
    app: Litestar, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with TestClient(app) as http:
        for name in ("api_key", "key", "access_token", "api-key", "authorization"):
            r = http.get("/v1/models", params={name: api_key})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", name
            assert http.get("/admin/keys", params={name: api_key}).status_code == 401
        assert http.post("/v1/chat/completions", json={**CHAT, "api_key": api_key}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": f"Basic {api_key}"}).status_code == 401
    text = server_log(caplog)
    assert "server.access" in text and api_key not in text and secret_middle(api_key) not in text


@pytest.fixture
def app(make_app: Callable[..., Litestar]) -> Litestar:
    return make_app(script=["ok"])


# ---- CORS -----------------------------------------------------------------------------------------------


def preflight(http: TestClient[Litestar], origin: str) -> httpx.Response:
    return http.options(
        "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_cors_is_closed_by_default(app: Litestar, api_key: str) -> None:
    with TestClient(app) as http:
        r = preflight(http, "https://evil.example")
        assert "access-control-allow-origin" not in r.headers
        r = http.get("/v1/models", headers={**bearer(api_key), "Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_allows_only_the_configured_origins(settings: Settings, api_key: str) -> None:
    env = {
        "LLM_SERVER_CORS_ALLOW_ORIGINS": "https://a.example",
        "LLM_SERVER_DATA_DIR": str(settings.data_dir),
        "LLM_SERVER_KEY_PEPPER": TEST_PEPPER,
    }
    s = load_settings(environ=env, dotenv=None)
    with TestClient(create_app(s, engine=FakeEngine(["ok"]))) as http:
        r = preflight(http, "https://a.example")
        assert r.status_code in (200, 204) and r.headers["access-control-allow-origin"] == "https://a.example"
        assert (
            "authorization" in r.headers.get("access-control-allow-headers", "").lower()
            or r.headers.get("access-control-allow-headers") == "*"
        )
        r = http.get("/v1/models", headers={**bearer(api_key), "Origin": "https://a.example"})
        assert r.headers["access-control-allow-origin"] == "https://a.example"
        for origin in ("https://b.example", "https://a.example.evil.example", "null"):
            r = preflight(http, origin)
            assert r.headers.get("access-control-allow-origin") not in (origin, "*"), origin
            r = http.get("/v1/models", headers={**bearer(api_key), "Origin": origin})
            assert r.headers.get("access-control-allow-origin") not in (origin, "*"), origin
