"""Schemathesis fuzzing of every route against the app's own OpenAPI document (routes and error envelope).

For every operation in ``GET /schema/openapi.json`` and each variant (the test's admin key, a well-formed but
unknown key, no key, on SQLite; the admin key on PostgreSQL when ``LLM_SERVER_TEST_POSTGRES_URL`` is set)
schemathesis generates requests, positive (schema-valid) and negative (schema-invalid) alike, and every response
must:

* never be a 5xx (client mistakes are never server errors);
* carry ``x-request-id``;
* when it is not 2xx, have exactly the error envelope ``{"error": {"message", "type", "param", "code"}}``;
* for keyed routes without a valid key, be 401 (or 429 once an address has used up its failed key checks);
* conform to the document (schemathesis' own checks): status documented, content type, headers, body schema
  (also each ``text/event-stream`` frame), schema-violating data rejected with a 4xx, ``405`` with ``Allow``
  for methods a path does not have.

Three cases in four are aimed at objects that exist, so they get past the 404s: the served model (``model``,
``{model_id}``), a fresh key created for that case (``{key_id}``: revoke, rotate) and the ``default`` role
(``{name}``). The test's own admin key is never a target: each (operation, variant) pair gets a fresh app over a
fresh copy of the test database, and within a pair the key's id (``key_`` + 16 random hex digits) is not something
the generator guesses, so revoking/rotating keys or changing roles cannot lock the run out halfway.

The default run is bounded for CI (``BOUNDED_EXAMPLES`` = 15 cases per pair, derandomized, no deadline; about a
minute on 2 cores with PostgreSQL, half that without). A longer run:

    LLM_SERVER_FUZZ_EXAMPLES=500 uv run pytest tests/integration/test_fuzz.py -q -s -p no:cacheprovider

(``-s`` prints the cases per pair and status classes; ``LLM_SERVER_FUZZ_REPORT=path.json`` also writes them.)
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis
import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import strategies as st
from litestar import Litestar
from litestar.testing import TestClient
from schemathesis.core.parameters import ParameterLocation as Location
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from persistence import migrate
from server.api.exceptions import to_openai_error
from server.app import create_app
from server.engine.fake import FakeEngine
from server.records.database import DatabaseUnavailable
from server.settings import Settings
from server.wiring.state import app_state
from tests.conftest import create_test_key

BOUNDED_EXAMPLES = 15
EXAMPLES = int(os.environ.get("LLM_SERVER_FUZZ_EXAMPLES") or BOUNDED_EXAMPLES)
REPORT = os.environ.get("LLM_SERVER_FUZZ_REPORT")
BAD_KEY = "sk-llm-" + "0" * 30  # well-formed, in no database
VARIANTS = ("admin_key", "invalid_key", "no_key", "admin_key_postgres")
ENVELOPE_KEYS = {"message", "type", "param", "code"}
MODEL = "fake"  # the FakeEngine's served model name
VICTIM_ROLE = "default"  # a role the fuzzer may reconfigure; the test's key has role "admin"

# Schemathesis' own checks that are sane for this API. Left out: `not_a_server_error` (asserted below, with the
# body), `positive_data_acceptance` (schema-valid is not always acceptable here: an unknown role, a prompt over the
# context window, unsupported parameter combinations are 400s by design), `ignored_auth` (the invalid-key and
# no-key variants check the same for every case; its probes with made-up keys would also use up the address's
# failed-key allowance and turn the admin variant into 429s), and the stateful-only checks.
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
    allow_header_conformance,
]


def _document() -> dict[str, Any]:
    """The OpenAPI document, from an app that is built but never started."""
    with tempfile.TemporaryDirectory() as folder:
        app = create_app(Settings(data_dir=Path(folder), key_pepper="x" * 32), engine=FakeEngine())
        return app.openapi_schema.to_schema()


DOCUMENT = _document()
OPERATIONS = [(method.upper(), path) for path, item in DOCUMENT["paths"].items() for method in item]
KEYED = {(m.upper(), p) for p, item in DOCUMENT["paths"].items() for m, op in item.items() if op.get("security")}
_counts: dict[str, dict[str, Any]] = {}

pytestmark = pytest.mark.fuzz


def checks_for(case: schemathesis.Case[Any]) -> list[Any]:
    """``CHECKS``, less ``negative_data_rejection`` for a repeated scalar query parameter (``?key=a&key=b``):
    Litestar reads the first value, the lenient reading most servers have; everything else is still checked."""
    meta = case.meta
    if meta and meta.is_negative_at(Location.QUERY) and any(isinstance(v, list) for v in (case.query or {}).values()):
        return [check for check in CHECKS if check is not negative_data_rejection]
    return CHECKS


def _auth_headers(variant: str, api_key: str, use_x_api_key: bool) -> dict[str, str]:
    key = BAD_KEY if variant == "invalid_key" else api_key if variant.startswith("admin_key") else None
    if key is None:
        return {}
    return {"X-API-Key": key} if use_x_api_key else {"Authorization": f"Bearer {key}"}


def _aim(case: schemathesis.Case[Any], targets: dict[str, str]) -> None:
    """Point the positive parts of a case at objects that exist (the served model, a key, a role): a random
    ``model`` or id is a 404 before anything interesting runs. Negative parts stay as generated, since a case may
    be negative *because* of that field."""
    meta = case.meta
    if isinstance(case.body, dict) and "model" in case.body and not (meta and meta.is_negative_at(Location.BODY)):
        case.body["model"] = targets["model"]
    if case.path_parameters and not (meta and meta.is_negative_at(Location.PATH)):
        for name in case.path_parameters:
            if name in targets:
                case.path_parameters[name] = targets[name]


def _strip_auth(case: schemathesis.Case[Any]) -> None:
    """Drop whatever auth headers the generator produced; the variant decides."""
    if case.headers:
        for name in [n for n in case.headers if n.lower() in ("authorization", "x-api-key")]:
            del case.headers[name]


def header(response: schemathesis.Response, name: str) -> str | None:
    values = response.headers.get(name.lower())
    return values[0] if values else None


def check_envelope(response: schemathesis.Response, label: str) -> None:
    """A non-2xx body is exactly ``{"error": {message: str, type: str, param: str|null, code: str|null}}``."""
    where = f"{label} -> {response.status_code}: {response.text[:300]!r}"
    assert (header(response, "content-type") or "").startswith("application/json"), where
    body = json.loads(response.content)
    assert isinstance(body, dict), where
    assert set(body) == {"error"}, where
    error = body["error"]
    assert isinstance(error, dict), where
    assert set(error) == ENVELOPE_KEYS, where
    assert isinstance(error["message"], str), where
    assert error["message"], where
    assert isinstance(error["type"], str), where
    assert error["param"] is None or isinstance(error["param"], str), where
    assert error["code"] is None or isinstance(error["code"], str), where


@pytest.fixture
def fuzz_app(request: pytest.FixtureRequest, variant: str, settings: Settings, api_key: str) -> tuple[Litestar, str]:
    """A fresh app (echoing the last user message) over a fresh database, and its admin key's secret.

    SQLite: a copy of the test database (the ``settings`` fixture). ``admin_key_postgres``: a new, migrated
    PostgreSQL database (``postgres_url``; skipped without ``LLM_SERVER_TEST_POSTGRES_URL``), whose types are
    stricter than SQLite's (32-bit INTEGER, bounded VARCHAR, no NUL in text).
    """
    if variant.endswith("_postgres"):
        url = request.getfixturevalue("postgres_url")
        settings = msgspec.structs.replace(settings, database_url=url)
        asyncio.run(migrate.upgrade(url))
        api_key = asyncio.run(create_test_key(settings))
    return create_app(settings, engine=FakeEngine(served_model_name=MODEL)), api_key


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz(fuzz_app: tuple[Litestar, str], method: str, path: str, variant: str) -> None:
    app, api_key = fuzz_app
    schema = schemathesis.openapi.from_asgi("/schema/openapi.json", app)  # starts the app's lifespan
    operation = schema[path][method]
    for _ in range(200):  # the engine loads in a task started by the lifespan
        if next(iter(app_state(app).models.engines.values())).ready:
            break
        time.sleep(0.01)
    assert next(iter(app_state(app).models.engines.values())).ready, "the fake engine did not start"
    label = f"{method} {path} [{variant}]"
    statuses: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    keyed = (method, path) in KEYED
    strategy = st.one_of(
        operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
        operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
    )

    def victim_key() -> str:
        """A fresh key to revoke or rotate (never the test's own, which the rest of the run needs)."""
        create = schema["/admin/keys"]["POST"].Case(body={"name": "fuzz-victim", "role": VICTIM_ROLE})
        response = create.call(headers={"Authorization": f"Bearer {api_key}"})
        assert response.status_code == 201, response.text
        return str(json.loads(response.content)["id"])

    @hypothesis.settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink],
    )
    @hypothesis.given(case=strategy, use_x_api_key=st.booleans(), aim=st.sampled_from((True, True, True, False)))
    def run(case: schemathesis.Case[Any], use_x_api_key: bool, aim: bool) -> None:
        _strip_auth(case)
        if aim:
            targets = {"model": MODEL, "model_id": MODEL, "name": VICTIM_ROLE}
            if "key_id" in (case.path_parameters or {}) and variant.startswith("admin_key"):
                targets["key_id"] = victim_key()  # only the admin variants can act on a key: the others get 401/429
            _aim(case, targets)
        headers = _auth_headers(variant, api_key, use_x_api_key)
        hypothesis.note(case.as_curl_command(headers=headers))
        response = case.call(headers=headers)
        statuses[f"{response.status_code // 100}xx" if response.status_code < 400 else str(response.status_code)] += 1
        modes[case.meta.generation.mode.value if case.meta is not None else "?"] += 1
        assert response.status_code < 500, f"{label}: server error {response.status_code}: {response.text[:500]!r}"
        assert header(response, "x-request-id"), f"{label}: no x-request-id"
        if not 200 <= response.status_code < 300:
            check_envelope(response, label)
            error = json.loads(response.content)["error"]
            errors[f"{response.status_code} {error['code'] or error['type']}"] += 1
        if keyed and not variant.startswith("admin_key"):
            assert response.status_code in (401, 429), f"{label}: {response.status_code} without a valid key"
        if not keyed:
            assert response.status_code != 401, f"{label}: public route asked for a key"
        case.validate_response(response, checks=checks_for(case), headers=headers)

    started = time.monotonic()
    run()
    _counts[label] = {
        "cases": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
        "modes": dict(modes),
        "errors": dict(errors.most_common()),
        "seconds": round(time.monotonic() - started, 2),
    }
    print(f"\n{label}: {_counts[label]}")
    if REPORT:
        Path(REPORT).write_text(json.dumps(_counts, indent=1, sort_keys=True))


def test_document_promises() -> None:
    """The document itself: key auth on ``/v1`` and ``/admin``, the error envelope for every non-2xx, SSE bodies
    for the streaming routes, ``x-request-id`` on every response (what the fuzzing above relies on)."""
    schemes = DOCUMENT["components"]["securitySchemes"]
    assert schemes["bearer"]["type"] == "http" and schemes["bearer"]["scheme"] == "bearer"
    assert schemes["apiKey"] == {**schemes["apiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    envelope = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    streaming = set()
    for path, item in DOCUMENT["paths"].items():
        for method, op in item.items():
            keyed = path.startswith(("/v1/", "/admin/")) or path in ("/tokenize", "/detokenize")
            assert (op.get("security") == [{"bearer": []}, {"apiKey": []}]) == keyed, (method, path)
            for status, response in op["responses"].items():
                assert response["headers"]["x-request-id"]["required"] is True, (method, path, status)
                if "text/event-stream" in response.get("content", {}):
                    streaming.add(path)
                if status.startswith("2") or (path, status) == ("/readyz", "503"):  # readyz: a probe body
                    continue
                assert response["content"] == envelope, (method, path, status)
            if keyed:
                assert {"401", "429"} <= set(op["responses"]), (method, path)
    assert streaming == {"/v1/chat/completions", "/v1/completions", "/v1/stream", "/v1/responses"}
    components = DOCUMENT["components"]["schemas"]
    assert sorted(components["ErrorBody"]["required"]) == sorted(ENVELOPE_KEYS)
    chat = components["ChatCompletionRequest"]["properties"]  # zero bounds on optional fields (StructBoundsPlugin)
    assert chat["temperature"]["minimum"] == 0 and chat["repetition_penalty"]["minimum"] == 0.01


def test_regressions_found_by_fuzzing(make_app: Callable[..., Litestar], authed: Callable[[Any], Any]) -> None:
    """Each was a 5xx for a client mistake: numbers past a column or ``datetime``, and (PostgreSQL) NUL in text,
    which asyncpg reports as a data exception that used to read as "database unavailable" (503)."""
    with authed(TestClient(make_app(FakeEngine(served_model_name=MODEL)))) as http:
        for path, body in (
            ("/admin/roles", {"name": "big", "max_concurrency": 2**70}),
            ("/admin/roles", {"name": "big", "rpm": 2**31}),
            ("/admin/keys", {"name": "far", "expires_in_days": 10**7}),
            ("/admin/roles", {"name": "blank", "models": [""]}),
        ):
            r = http.post(path, json=body)
            assert r.status_code == 400 and r.json()["error"]["param"], (body, r.text)
        made = http.post("/admin/keys", json={"name": "victim"}).json()
        r = http.post(f"/admin/keys/{made['id']}/rotate", json={"grace_hours": 1e12})
        assert r.status_code == 400 and r.json()["error"]["param"] == "grace_hours"

    class DriverError(Exception):
        sqlstate = "22021"  # character_not_in_repertoire: what asyncpg raises for NUL in text

    class Wrapped(Exception):
        orig = DriverError()

    try:
        try:
            raise Wrapped("invalid byte sequence for encoding UTF8: 0x00")
        except Wrapped as exc:
            raise DatabaseUnavailable("DBAPIError") from exc
    except DatabaseUnavailable as exc:
        err = to_openai_error(exc)
    assert (err.status, err.type) == (400, "invalid_request_error")
