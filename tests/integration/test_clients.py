"""The shipped client examples run against a live server; the typed native client round-trips."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from clients.native import NativeClient, NativeClientError
from schemas.native.generate import GenerateRequest
from tests.live import live_server

ROOT = Path(__file__).resolve().parents[2]


def test_native_client(make_app: Callable[..., Litestar], authed: Callable[[Any], Any], api_key: str) -> None:
    with authed(TestClient(make_app(script=["a", "b", "c"]))) as http:
        client = NativeClient("http://testserver.local", api_key=api_key, http=http)
        out = client.generate(GenerateRequest(prompt="x", max_new_tokens=2))
        assert out.output == "ab"
        assert out.finish_reason == "length"
        events = list(client.stream(GenerateRequest(prompt="x")))
        assert "".join(e.output for e in events) == "abc"
        assert events[-1].usage is not None and events[-1].usage.completion_tokens == 4
        with pytest.raises(NativeClientError) as err:
            client.generate(GenerateRequest(prompt="x", model="other"))
        assert err.value.status == 404


def test_example_scripts_run(make_app: Callable[..., Litestar], monkeypatch: pytest.MonkeyPatch, api_key: str) -> None:
    with live_server(make_app(script=["hi", " there"])) as base:
        monkeypatch.setenv("OPENAI_BASE_URL", base + "/v1")
        monkeypatch.setenv("MODEL", "fake")
        monkeypatch.setenv("OPENAI_API_KEY", api_key)
        from clients import langchain_chat, openai_sdk

        openai_sdk.main()
        langchain_chat.main()
        out = subprocess.run(["bash", str(ROOT / "clients" / "curl.sh")], capture_output=True, text=True, check=True)
        assert '"content":"hi there"' in out.stdout
        assert "data: [DONE]" in out.stdout


def test_examples_read_the_sdk_variables_not_the_servers() -> None:
    """The examples are configured as the openai SDK is; ``LLM_SERVER_*`` variables configure the server."""
    for path in [*(ROOT / "clients").glob("*.py"), ROOT / "clients" / "curl.sh"]:
        text = path.read_text(encoding="utf-8")
        assert "LLM_SERVER_" not in text, path.name
    curl = (ROOT / "clients" / "curl.sh").read_text(encoding="utf-8")
    assert "OPENAI_API_KEY" in curl and "OPENAI_BASE_URL" in curl and "${MODEL:-" in curl
