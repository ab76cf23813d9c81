"""Forced tool calls in each family's format on the real Transformers engine: the tiny model (random weights) with
a Llama 3 or Mistral style chat template can only write calls that the format's parser reads back."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server.app import create_app
from server.engine.hf import HFEngine
from tests.conftest import migrated_settings, ready_client
from tests.fakes.templated import HERMES_TEMPLATE, LLAMA3_TEMPLATE, MISTRAL_TEMPLATE

pytestmark = pytest.mark.slow


def tool(name: str, key: str, values: list[str]) -> dict[str, Any]:
    parameters = {
        "type": "object",
        "properties": {key: {"enum": values}},
        "required": [key],
        "additionalProperties": False,
    }
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


TOOLS = [tool("get_weather", "city", ["Paris", "Oslo"]), tool("get_time", "zone", ["UTC", "CET"])]
VALID = [{"city": "Paris"}, {"city": "Oslo"}, {"zone": "UTC"}, {"zone": "CET"}]
USER = [{"role": "user", "content": "Weather in Paris?"}]
TEMPLATES = {"hermes": HERMES_TEMPLATE, "llama3_json": LLAMA3_TEMPLATE, "mistral": MISTRAL_TEMPLATE}


@pytest.fixture(scope="module", params=["llama3_json", "mistral", "hermes"])
def family_client(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, TestClient[Litestar]]]:
    family: str = request.param
    folder = tmp_path_factory.mktemp(family) / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").write_text(TEMPLATES[family])
    settings, key = migrated_settings(tmp_path_factory.mktemp("data"), model=str(folder), cache_enabled=False)
    engine = HFEngine(str(folder), served_model_name="tiny", data_dir=settings.data_dir, device="cpu", dtype="float32")
    with ready_client((engine, create_app(settings, engine=engine), key)) as client:
        yield family, client


def chat(client: TestClient[Litestar], **body: Any) -> Any:
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": USER, "tools": TOOLS, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_required_calls_are_written_and_parsed_in_the_format(family_client: tuple[str, TestClient[Litestar]]) -> None:
    _, client = family_client
    for seed in range(3):
        # One call, so that random weights cannot go on adding calls until max_tokens.
        out = chat(client, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=60)
        choice = out["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        assert choice["message"]["content"] is None
        [call] = choice["message"]["tool_calls"]
        args = json.loads(call["function"]["arguments"])
        assert args in VALID, call
    # Several calls: each one read back is whole and valid (a call cut by max_tokens stays content).
    calls = chat(client, tool_choice="required", temperature=1.0, seed=5, max_tokens=120)["choices"][0]["message"]
    assert calls["tool_calls"] and all(json.loads(c["function"]["arguments"]) in VALID for c in calls["tool_calls"])


def test_a_named_call_streams_as_it_is_returned(family_client: tuple[str, TestClient[Litestar]]) -> None:
    _, client = family_client
    named = {"type": "function", "function": {"name": "get_time"}}
    whole = chat(client, tool_choice=named, temperature=0, max_tokens=60)["choices"][0]
    [call] = whole["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time"
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": USER,
            "tools": TOOLS,
            "tool_choice": named,
            "temperature": 0,
            "max_tokens": 60,
            "stream": True,
        },
    )
    name, arguments, finish = "", "", None
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])["choices"][0]
            for tc in chunk["delta"].get("tool_calls") or []:
                name += tc["function"].get("name") or ""
                arguments += tc["function"].get("arguments") or ""
            finish = chunk["finish_reason"] or finish
    assert (name, arguments, finish) == ("get_time", call["function"]["arguments"], "tool_calls")
