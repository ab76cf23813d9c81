"""A reasoning template on the real Transformers engine: detection, template kwargs and a constraint after reasoning.

The tiny model's own folder with a chat template that opens ``<think>`` in its generation prompt (as DeepSeek-R1
distills do) unless ``enable_thinking`` is false (then it closes an empty block, as Qwen3 does).
"""

from __future__ import annotations

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

pytestmark = pytest.mark.slow

OPENS_THINKING = (
    "{%- if add_generation_prompt -%}\n{{- '<|im_start|>assistant\\n' -}}\n"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>\\n' -}}{%- endif -%}\n{%- endif -%}"
)
MESSAGES = [{"role": "user", "content": "Give me a JSON object."}]


@pytest.fixture(scope="module")
def folder(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("reasoning") / "tiny-think"
    shutil.copytree(tiny_model_dir, folder)
    template = (folder / "chat_template.jinja").read_text()
    head, sep, _ = template.rpartition("{%- if add_generation_prompt -%}")
    assert sep
    (folder / "chat_template.jinja").write_text(head + OPENS_THINKING)
    return folder


@pytest.fixture(scope="module")
def http(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient[Litestar]]:
    settings, key = migrated_settings(
        tmp_path_factory.mktemp("data"), model=str(folder), dtype="float32", cache_enabled=False
    )
    engine = HFEngine(
        settings.model, served_model_name="tiny", data_dir=settings.data_dir, device="cpu", dtype="float32"
    )
    with ready_client((engine, create_app(settings, engine=engine), key)) as client:
        yield client


@pytest.fixture(scope="module")
def braces(folder: Path) -> dict[str, int]:
    """``logit_bias`` that makes greedy decoding pick ``{`` or ``}`` wherever the grammar allows either."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer.encode(brace, add_special_tokens=False) for brace in ("{", "}")]
    assert all(len(i) == 1 for i in ids)
    return {str(i[0]): 100 for i in ids}


def chat(http: TestClient[Litestar], **body: Any) -> dict[str, Any]:
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_output_after_an_opened_think_is_reasoning(http: TestClient[Litestar]) -> None:
    body = chat(http, max_tokens=6)
    message, usage = body["choices"][0]["message"], body["usage"]
    assert isinstance(message["reasoning_content"], str)
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    assert 0 < reasoning <= usage["completion_tokens"]
    if message["content"] is None:  # never closed within max_tokens: all of it was reasoning
        assert reasoning == usage["completion_tokens"] - (body["choices"][0]["finish_reason"] == "stop")


def test_a_json_constraint_does_not_bind_the_reasoning(http: TestClient[Litestar], braces: dict[str, int]) -> None:
    # Inside the reasoning the braces are free text, so greedy decoding keeps picking them; the JSON grammar alone
    # would allow only "{" first and force EOS after "{}".
    body = chat(http, max_tokens=8, response_format={"type": "json_object"}, logit_bias=braces)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length"
    reasoning = choice["message"]["reasoning_content"]
    assert len(reasoning) == 8 and set(reasoning) <= {"{", "}"}
    assert choice["message"]["content"] is None
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 8}


def test_without_reasoning_the_constraint_applies_at_once(http: TestClient[Litestar], braces: dict[str, int]) -> None:
    body = chat(
        http,
        max_tokens=8,
        response_format={"type": "json_object"},
        logit_bias=braces,
        chat_template_kwargs={"enable_thinking": False},
    )
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == "{}" and choice["message"]["reasoning_content"] is None
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}


def test_template_kwargs_change_the_prompt(http: TestClient[Litestar]) -> None:
    on = chat(http, max_tokens=1)["usage"]["prompt_tokens"]
    off = chat(http, max_tokens=1, chat_template_kwargs={"enable_thinking": False})["usage"]["prompt_tokens"]
    assert off > on
