"""`llm-server serve` as a real process: builds the demo model, becomes ready, serves the SDK, stops on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.live import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    data_dir = tmp_path_factory.mktemp("serve-data")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SERVER_")}
    env |= {"LLM_SERVER_DATA_DIR": str(data_dir), "LLM_SERVER_DTYPE": "float32", "HF_HUB_OFFLINE": "1"}
    # The CLI creates the key (migrating the fresh database first), as a newcomer would.
    created = subprocess.run(
        [sys.executable, "-m", "server", "keys", "create", "--name", "t", "--role", "admin", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    api_key = json.loads(created.stdout)["key"]
    log = (data_dir / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while True:
            assert proc.poll() is None, (data_dir / "server.log").read_text()
            assert time.monotonic() - started < 120, "server not ready in 120 s"
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        print(f"\nserve -> /readyz 200 in {time.monotonic() - started:.2f}s")
        yield base, api_key
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
            log.close()
    text = (data_dir / "server.log").read_text()
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells how it ended.
    assert proc.returncode in (0, -signal.SIGTERM), text
    assert "Application shutdown complete" in text
    assert "random weights" in text  # the start-up warning about the demo model
    assert (data_dir / "models" / "tiny-chat" / "config.json").is_file()


def test_sdk_sync_against_the_process(server: tuple[str, str]) -> None:
    base, api_key = server
    with openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0) as client:
        assert [m.id for m in client.models.list().data] == ["tiny-chat"]
        msgs = [{"role": "user", "content": "hello"}]
        full = client.chat.completions.create(model="tiny-chat", messages=msgs, temperature=0, max_tokens=20)  # type: ignore[arg-type]
        stream = client.chat.completions.create(
            model="tiny-chat",
            messages=msgs,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=20,
            stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == full.choices[0].message.content


@pytest.mark.anyio
async def test_sdk_async_against_the_process(server: tuple[str, str]) -> None:
    base, api_key = server
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0) as client:
        stream = await client.completions.create(model="tiny-chat", prompt="def ", max_tokens=10, stream=True)
        chunks = [c async for c in stream]
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        with pytest.raises(openai.BadRequestError) as err:
            await client.completions.create(model="tiny-chat", prompt="def ", max_tokens=100_000)
        assert err.value.code == "context_length_exceeded"


def test_langchain_against_the_process(server: tuple[str, str]) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="tiny-chat",
        base_url=f"{server[0]}/v1",
        api_key=server[1],  # type: ignore[arg-type]
        temperature=0,
        max_completion_tokens=12,  # type: ignore[call-arg]
        max_retries=0,
    )
    invoked = llm.invoke("hello")
    streamed = "".join(str(c.content) for c in llm.stream("hello"))
    assert streamed == invoked.content


def test_curl_frames_are_exact(server: tuple[str, str]) -> None:
    body = {"model": "tiny-chat", "prompt": "a", "max_tokens": 3, "stream": True, "ignore_eos": True}
    auth = {"Authorization": f"Bearer {server[1]}"}
    with httpx.stream("POST", f"{server[0]}/v1/completions", json=body, headers=auth) as r:
        raw = b"".join(r.iter_raw())
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"" and frames[-2] == b"data: [DONE]"
    assert all(f.startswith(b"data: {") for f in frames[:-2])
    assert b"\r" not in raw
