"""The official openai SDK against a local llm-server: non-streaming and streaming chat.

Run the server first (``uv run llm-server serve``), then ``uv run python -m clients.openai_sdk``.
"""

from __future__ import annotations

import os

from openai import OpenAI


def main() -> None:
    client = OpenAI(
        base_url=os.environ.get("LLM_SERVER_URL", "http://127.0.0.1:8000") + "/v1",
        api_key=os.environ.get("LLM_SERVER_API_KEY", "none"),
    )
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=32, temperature=0
    )
    print("non-streaming:", reply.choices[0].message.content, reply.usage)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    print("streaming: ", end="")
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage:
            print("\nusage:", chunk.usage)


if __name__ == "__main__":
    main()
