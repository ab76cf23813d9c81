"""``/v1/models`` shows a role only the models it may use; any other id is 404, as OpenAI answers."""

from __future__ import annotations

import asyncio

from litestar.testing import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings
from server.wiring.models import ServedModels
from tests.conftest import add_role_key, bearer


def test_models_list_and_retrieve_follow_the_role_allowlist(settings: Settings, api_key: str) -> None:
    served = ServedModels()
    for name in ("alpha", "beta", "org/gamma"):
        served.add(name, FakeEngine(["ok"], served_model_name=name))
    narrow = asyncio.run(add_role_key(settings, "narrow", allowed_models=["beta", "org/gamma", "not-served"]))
    none = asyncio.run(add_role_key(settings, "none", allowed_models=[]))
    with TestClient(create_app(settings, models=served)) as http:
        listed = http.get("/v1/models", headers=bearer(api_key)).json()
        assert [m["id"] for m in listed["data"]] == ["alpha", "beta", "org/gamma"]  # no allowlist: every model

        listed = http.get("/v1/models", headers=bearer(narrow)).json()
        assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["beta", "org/gamma"]
        assert http.get("/v1/models/beta", headers=bearer(narrow)).json()["id"] == "beta"
        assert http.get("/v1/models/org/gamma", headers=bearer(narrow)).json()["id"] == "org/gamma"
        for model in ("alpha", "not-served", "nope"):  # not allowed, allowed but not served, unknown: all alike
            r = http.get(f"/v1/models/{model}", headers=bearer(narrow))
            assert r.status_code == 404, r.text
            err = r.json()["error"]
            assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "model_not_found", "model")
            assert err["message"] == f"The model '{model}' does not exist or you do not have access to it."
        assert http.get("/v1/models/alpha", headers=bearer(api_key)).status_code == 200

        assert http.get("/v1/models", headers=bearer(none)).json()["data"] == []
        assert http.get("/v1/models/beta", headers=bearer(none)).status_code == 404
        # Using a model is still the allowlist's 403 (the model exists; this role may not use it).
        r = http.post(
            "/v1/chat/completions",
            json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}]},
            headers=bearer(narrow),
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"


def test_an_allowlist_change_applies_to_the_listing_at_once(settings: Settings, api_key: str) -> None:
    served = ServedModels()
    for name in ("alpha", "beta"):
        served.add(name, FakeEngine(["ok"], served_model_name=name))
    key = asyncio.run(add_role_key(settings, "team", allowed_models=["alpha"]))
    with TestClient(create_app(settings, models=served)) as http:
        assert [m["id"] for m in http.get("/v1/models", headers=bearer(key)).json()["data"]] == ["alpha"]
        r = http.patch("/admin/roles/team", json={"models": ["beta"]}, headers=bearer(api_key))
        assert r.status_code == 200
        assert [m["id"] for m in http.get("/v1/models", headers=bearer(key)).json()["data"]] == ["beta"]
        assert http.get("/v1/models/alpha", headers=bearer(key)).status_code == 404


def test_models_carry_their_context_window(settings: Settings, api_key: str) -> None:
    """vLLM's ``max_model_len`` extension: a gateway forwarding to this server sizes its max tokens from it."""
    with TestClient(create_app(settings, engine=FakeEngine(max_model_len=1234))) as http:
        http.headers["Authorization"] = f"Bearer {api_key}"
        listed = http.get("/v1/models").json()["data"]
        assert listed == [{"id": "fake", "object": "model", "created": listed[0]["created"], "owned_by": "llm-server",
                           "max_model_len": 1234}]  # fmt: skip
        assert http.get("/v1/models/fake").json()["max_model_len"] == 1234
